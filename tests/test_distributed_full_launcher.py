"""Full fine-tuning through the torchrun launcher on a tiny real Z-Image (ComfyUI classes, 2 gloo ranks, FSDP2):
2 ranks x batch 1 == 1 rank x batch 2 (atol 1e-5 + rtol 1e-4, float32 reduction order), gradient checkpointing
under FSDP2 gives the same weights, the base file is untouched, and the written diffusion model loads in UNETLoader
in a real server and samples."""
import hashlib
import shutil

import pytest
import safetensors.torch
import torch

import comfy_fixtures as F
import distributed_support as D
from conftest import TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

pytestmark = pytest.mark.server
STEPS = 2


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def zimage_set(pack, tmp_path_factory):
    from comfyui_dopsd.dopsd_core import exported_set
    gen = torch.Generator().manual_seed(0)
    width = F.TINY_ZIMAGE["cap_feat_dim"]
    pairs = [{"caption": f"pair {i}", "latent": torch.randn(1, 16, 8, 8, generator=gen),
              "student": [[torch.randn(1, 8, width, generator=gen), {"pooled_output": None}]],
              "teacher": [[torch.randn(1, 12, width, generator=gen), {"pooled_output": None}]]} for i in range(2)]
    family = {"model_class": "ZImage", "image_model": "lumina2", "context_width": width}
    schedule = {"rollout_sigmas": [1.0, 0.5], "inference_sigmas": [1.0, 0.75, 0.5, 0.25, 0.0]}
    recipe = {"method": "dopsd", "loss_space": "x0", "rank": 4, "alpha": 4.0, "learning_rate": 1e-4,
              "ema_decay": 0.9, "targets": ["*"]}
    return exported_set.write_set(str(tmp_path_factory.mktemp("zset") / "set"), pairs, family, schedule, recipe)


@pytest.fixture(scope="module")
def runs(comfy_server, zimage_set, tmp_path_factory):
    base = comfy_server.base_dir / "models" / "diffusion_models" / TINY_ZIMAGE_FILE
    before = _sha(base)
    tmp = tmp_path_factory.mktemp("full")
    out2, out1 = tmp / "r2" / "full2.safetensors", tmp / "r1" / "full1.safetensors"
    logs = D.run_ranks(2, D.launcher_args(base, zimage_set, out2, full=True, steps=STEPS, save_every=0), tmp / "log2")
    assert "full fine-tuning, FSDP2-sharded" in logs[0]
    D.run_ranks(1, D.launcher_args(base, zimage_set, out1, full=True, steps=STEPS, global_batch=2, save_every=0),
                tmp / "log1")
    outgc = tmp / "gc" / "full_gc.safetensors"
    D.run_ranks(2, D.launcher_args(base, zimage_set, outgc, full=True, steps=STEPS, save_every=0,
                                   gradient_checkpointing=True), tmp / "loggc")
    return base, before, out2, out1, outgc


def test_full_finetune_two_ranks_equal_one_rank_batch2_and_base_untouched(runs):
    base, before, out2, out1, outgc = runs
    assert _sha(base) == before
    a, b, orig = (safetensors.torch.load_file(str(p)) for p in (out2, out1, base))
    assert set(a) == set(b) == set(orig)
    for k in a:
        assert a[k].dtype == orig[k].dtype
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(not torch.equal(a[k], orig[k]) for k in a)  # it trained
    gc = safetensors.torch.load_file(str(outgc))  # blocks recomputed in backward under FSDP2: same result
    for k in a:
        torch.testing.assert_close(gc[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_full_finetune_output_loads_in_unetloader_and_samples(runs, comfy_server):
    out2 = runs[2]
    name = "dopsd_full_test.safetensors"
    shutil.copy(out2, comfy_server.base_dir / "models" / "diffusion_models" / name)

    def graph(unet, prefix):
        return {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
            "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
            "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {
                "model": ["4", 0], "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
        }

    latents = {}
    for unet, prefix in ((name, "dopsd_full/tuned"), (TINY_ZIMAGE_FILE, "dopsd_full/base")):
        entry = comfy_server.run_prompt(graph(unet, prefix), timeout=120)
        saved = entry["outputs"]["9"]["latents"][0]
        path = comfy_server.base_dir / "output" / saved["subfolder"] / saved["filename"]
        latents[prefix] = safetensors.torch.load_file(str(path))["latent_tensor"]
    tuned, base = latents["dopsd_full/tuned"], latents["dopsd_full/base"]
    assert torch.isfinite(tuned).all() and tuned.shape == base.shape
    assert not torch.allclose(tuned, base)
