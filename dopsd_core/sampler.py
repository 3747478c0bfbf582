"""The few-step Euler sampler, i.e. what the user runs after training (KSampler euler, cfg 1)."""
from typing import Callable, Optional

import torch

from .flow import euler_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_euler(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
                 callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1]; starts at sigmas[0] * noise like ComfyUI on an empty latent.

    callback(step, x, v) sees every state the sampler visits and the velocity it used there.
    """
    sigmas = sigmas.to(noise.device)
    x = sigmas[0] * noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0])
        v = velocity_fn(x, sigma)
        if callback is not None:
            callback(i, x, v)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x
