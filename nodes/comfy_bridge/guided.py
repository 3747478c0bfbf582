"""Run model predictions through ComfyUI's own sampling path, so training sees what inference sees.

Each call builds a CFGGuider over the job's ModelPatcher and runs a one-shot `Sampler` whose `sample()`
receives the guider with processed conditioning (encode_model_conds, reference latents, masks ...). Inside,
velocities come from `calc_cond_batch`, exactly like a KSampler step at cfg 1. Calling `guider.sample` per
step also means load_models_gpu and pre_run re-establish the job's patches (LoRA injection) after any
prompt that used the same model in between.
"""
import contextlib

import comfy.model_management
import comfy.samplers
import torch


def velocity_fn(model_wrap, model_options, cond_key):
    """fn(x, sigma[B]) -> v = (x - denoised) / sigma for the conditioning stored under `cond_key`."""
    base, conds = model_wrap.inner_model, model_wrap.conds

    def fn(x, sigma):
        denoised = comfy.samplers.calc_cond_batch(base, [conds[cond_key]], x, sigma, model_options)[0]
        return (x - denoised) / sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    return fn


class _OneShotSampler(comfy.samplers.Sampler):
    def __init__(self, body):
        self.body = body
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.body(model_wrap, extra_args["model_options"], latent_image, noise)
        return latent_image if latent_image is not None else noise


@contextlib.contextmanager
def training_flags():
    """Newer ComfyUI switches RoPE to an autograd-safe kernel while `in_training` is set."""
    has = hasattr(comfy.model_management, "in_training")
    old = getattr(comfy.model_management, "in_training", None)
    if has:
        comfy.model_management.in_training = True
    try:
        yield
    finally:
        if has:
            comfy.model_management.in_training = old


def run_guided(model, conds: dict, latent: torch.Tensor, body, sigmas=None, seed: int = 0):
    """Call body(model_wrap, model_options, latent_in_model_space, noise) inside guider.sample.

    conds: {"positive": CONDITIONING, "teacher": CONDITIONING, ...}; latent: VAE-space latent batch whose
    shape sets the noise shape (and which is the x0 target where one is needed).
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    guider.set_cfg(1.0)
    sampler = _OneShotSampler(body)
    sigmas = torch.tensor([1.0, 0.0]) if sigmas is None else sigmas
    guider.sample(torch.zeros_like(latent), latent, sampler, sigmas, seed=seed)
    return sampler.result
