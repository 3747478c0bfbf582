"""The pack inside the real ComfyUI, in-process: registration, and ComfyUI's own KSampler on tiny real models."""
import asyncio
import os
from pathlib import Path

import pytest
import torch

import comfy_env
import comfy_fixtures as F

import nodes  # ComfyUI's nodes.py (comfy_env puts ComfyUI first on sys.path)
from comfy_api.latest import ComfyExtension, io
from comfy_extras.nodes_edit_model import ReferenceLatent
from comfy_extras.nodes_flux import EmptyFlux2LatentImage, Flux2Scheduler
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

ZIMAGE_8_STEP_SIGMAS = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]


def _builtin_io_types():
    return {v.io_type for v in vars(io).values() if isinstance(getattr(v, "io_type", None), str)}


def _socket_types(node_cls):
    schema = node_cls.GET_SCHEMA()
    return [s.io_type for s in (schema.inputs or []) + (schema.outputs or [])]


def test_comfyui_nodes_module_is_comfyuis(comfy_root):
    assert Path(nodes.__file__).resolve().parent == comfy_root
    assert Path(nodes.__file__).name == "nodes.py"


def test_pack_imports_inside_real_comfyui(pack):
    import comfy.model_management

    print(f"\nComfyUI {comfy_env.comfy_version()} at {comfy_env.comfy_root()}, device "
          f"{comfy.model_management.get_torch_device()}; pack {pack.__name__}: {sorted(pack.NODE_CLASS_MAPPINGS)}")
    assert comfy.model_management.get_torch_device() == torch.device("cpu")
    assert pack.NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    web = Path(pack.__file__).parent / pack.WEB_DIRECTORY
    assert sorted(p.name for p in web.glob("*.js")), "WEB_DIRECTORY has no .js"


def test_node_ids_and_socket_types(pack):
    builtin = _builtin_io_types()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("DOPSD"), node_id
        assert issubclass(cls, io.ComfyNode), f"{node_id} is not a V3 node"
        assert cls.GET_SCHEMA().node_id == node_id
        for t in _socket_types(cls):
            assert t in builtin or t.startswith("DOPSD_"), f"{node_id}: custom socket type {t!r} needs a DOPSD_ prefix"


def test_v3_entrypoint_lists_the_same_nodes(pack):
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    listed = asyncio.run(extension.get_node_list())
    assert {c.GET_SCHEMA().node_id for c in listed} == set(pack.NODE_CLASS_MAPPINGS)


def test_comfyui_custom_node_loader_accepts_pack(tmp_path):
    """nodes.load_custom_node, the function ComfyUI's startup calls for each custom_nodes entry."""
    link = tmp_path / "comfyui-dopsd"
    link.symlink_to(comfy_env.REPO, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(str(link), ignore=before, module_parent="custom_nodes"))
    added = set(nodes.NODE_CLASS_MAPPINGS) - before
    assert added and all(n.startswith("DOPSD") for n in added), added
    assert os.path.samefile(nodes.EXTENSION_WEB_DIRS["comfyui-dopsd"], comfy_env.REPO / "web")


# -- ComfyUI's own sampling on tiny models -------------------------------------------------------------------

def _sample(model, positive, latent, steps, seed=42):
    return nodes.KSampler().sample(model, seed, steps, 1.0, "euler", "simple", positive, positive, latent)[0]["samples"]


def test_tiny_zimage_ksampler(tiny_zimage, tiny_zimage_clip):
    (cond,) = nodes.CLIPTextEncode().encode(tiny_zimage_clip, "a photo of a cat")
    assert cond[0][0].shape[-1] == F.TINY_ZIMAGE["cap_feat_dim"]
    (model,) = ModelSamplingAuraFlow().patch_aura(tiny_zimage, 3.0)
    (latent,) = nodes.EmptyLatentImage().generate(256, 256, 1)
    a = _sample(model, cond, latent, 8)
    b = _sample(model, cond, latent, 8)
    assert a.shape == (1, 16, 32, 32)  # ComfyUI widened the 4-channel empty latent to Flux's 16
    assert torch.isfinite(a).all() and a.std() > 0
    assert torch.equal(a, b), "same seed, same model: sampling must be deterministic"
    assert not torch.equal(a, _sample(model, cond, latent, 8, seed=43))


def test_tiny_flux2_ksampler_with_reference_latent(tiny_flux2, flux2_conditioning):
    latent = EmptyFlux2LatentImage.execute(width=256, height=256, batch_size=1)[0]
    cond = flux2_conditioning(seed=0)
    plain = _sample(tiny_flux2, cond, latent, 4)
    assert plain.shape == (1, 128, 16, 16) and torch.isfinite(plain).all()
    reference = {"samples": torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(1))}
    ref_cond = ReferenceLatent.execute(conditioning=cond, latent=reference)[0]
    assert len(ref_cond[0][1]["reference_latents"]) == 1
    with_ref = _sample(tiny_flux2, ref_cond, latent, 4)
    assert torch.isfinite(with_ref).all()
    assert not torch.allclose(plain, with_ref), "the reference latent did not reach the model"
    assert torch.equal(with_ref, _sample(tiny_flux2, ref_cond, latent, 4))


def test_few_step_sigmas_node(pack, tiny_zimage, tiny_flux2):
    node = pack.NODE_CLASS_MAPPINGS["DOPSDFewStepSigmas"]
    (model,) = ModelSamplingAuraFlow().patch_aura(tiny_zimage, 3.0)
    sigmas = node.execute(model=model, steps=8, schedule="auto", width=256, height=256)[0]
    assert torch.allclose(sigmas, torch.tensor(ZIMAGE_8_STEP_SIGMAS), atol=1e-4)
    flux2 = node.execute(model=tiny_flux2, steps=4, schedule="auto", width=256, height=256)[0]
    assert torch.allclose(flux2, Flux2Scheduler.execute(steps=4, width=256, height=256)[0])


def test_tiny_vaes_round_trip_shapes(tiny_flux_vae, tiny_flux2_vae):
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    for vae, channels, ratio in [(tiny_flux_vae, 16, 8), (tiny_flux2_vae, 128, 16)]:
        lat = vae.encode(img)
        assert lat.shape == (1, channels, 64 // ratio, 64 // ratio)
        out = vae.decode(lat)
        assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()


def test_tiny_klein_text_encoder_drives_flux2(tiny_klein_clip, tiny_flux2):
    (cond,) = nodes.CLIPTextEncode().encode(tiny_klein_clip, "a photo of a cat")
    assert cond[0][0].shape[-1] == F.TINY_FLUX2["context_in_dim"]
    latent = EmptyFlux2LatentImage.execute(width=128, height=128, batch_size=1)[0]
    assert torch.isfinite(_sample(tiny_flux2, cond, latent, 2)).all()


@pytest.mark.parametrize("builder", [F.build_tiny_zimage, F.build_tiny_flux2])
def test_builders_are_deterministic(builder):
    a, b = builder(seed=3).model.state_dict(), builder(seed=3).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
