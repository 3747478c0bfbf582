"""A job never computes gradients for the base model's weights, whatever the model's parameters say.

ComfyUI's loaders inside the executor give inference tensors (which lora_patch aliases without gradients), but
a model built or loaded outside the executor (the torchrun launcher, the GPU harness, another node pack) has
plain parameters with requires_grad=True. Before the fix, every such weight got a .grad (a second copy of the
model in memory; the real-size harness measured 16.9 GiB for klein-4B against a 10.2 GiB budget) and fp8
base weights crashed in backward ("add_stub" not implemented for 'Float8_e4m3fn')."""
import pytest
import torch

import comfy_fixtures as F
from nodes_support import executor_mode, start_job, wait_state


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


def _pairs(N, clip, vae):
    with executor_mode():
        images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(images, "a [trigger] cat", "sks", 64)[0]
        return N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, clip, vae, "as in the image:")[0]


def _fp8_zimage():
    """Tiny Z-Image with float8_e4m3fn weights computed in fp32 (ComfyUI's manual-cast ops), as
    `weight_dtype fp8_e4m3fn` in UNETLoader gives on a GPU without fp8 compute."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.ZImage(F.host_unet_config(F.TINY_ZIMAGE))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    model = config.get_model({}, device="cpu")
    sd = F.diffusion_state_dict("ZImage", F.TINY_ZIMAGE, seed=0)
    model.load_model_weights({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _train(N, model, pairs, steps=2):
    job, _ = start_job(N, model, pairs, steps=steps)
    assert wait_state(job, ("finished", "error"), timeout=180) == "finished", job.error
    assert job.wait(60)  # the state is set before the job releases (ejects) its model
    return job


def test_plain_parameters_get_no_gradient_and_keep_their_flag(N, tiny_zimage_clip, tiny_flux_vae):
    model = F.build_tiny_zimage(seed=0)  # outside the executor: plain parameters
    model.model.diffusion_model.requires_grad_(True)  # as 0.3.75's loader leaves them (0.33's ops do not)
    params = list(model.model.diffusion_model.parameters())
    assert all(p.requires_grad and not p.is_inference() for p in params)
    job = _train(N, model, _pairs(N, tiny_zimage_clip, tiny_flux_vae))
    with_grad = [n for n, p in model.model.diffusion_model.named_parameters() if p.grad is not None]
    assert with_grad == [], f"base weights got gradients: {with_grad[:4]}"
    assert all(p.requires_grad for p in params)  # put back as found once the job released the model
    assert any(h.abs().sum() > 0 for k, h in job.lora_state_dict().items() if "lora_up" in k)


def test_fp8_base_weights_train(N, tiny_zimage_clip, tiny_flux_vae):
    model = _fp8_zimage()
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    job = _train(N, model, _pairs(N, tiny_zimage_clip, tiny_flux_vae))
    losses = [loss for _, loss in job.status()["losses"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert any(h.abs().sum() > 0 for k, h in job.lora_state_dict().items() if "lora_up" in k)
    after = model.model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
