"""Flow-matching arithmetic in ComfyUI's convention (CONST model sampling).

x_t = sigma * noise + (1 - sigma) * x0, velocity v = noise - x0, so x0 = x_t - sigma * v.
Every part of the pack (trainer, toy world, previews) goes through these four functions so that a
sign or broadcasting mistake can only exist in one place.
"""
import torch


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample sigma [B] (or a scalar) shaped to broadcast over x [B, ...]."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return s * noise + (1.0 - s) * x0


def x0_from_velocity(x_t: torch.Tensor, sigma, v: torch.Tensor) -> torch.Tensor:
    return x_t - _bcast(sigma, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """Inverse of x0_from_velocity; undefined at sigma == 0 (the caller must avoid it)."""
    return (x_t - x0) / _bcast(sigma, x_t)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler update along the flow, as ComfyUI's `euler` sampler does (d = v for CONST)."""
    return x + (_bcast(sigma_next, x) - _bcast(sigma, x)) * v
