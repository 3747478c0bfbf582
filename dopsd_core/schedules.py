"""Few-step sigma schedules that reproduce ComfyUI's, so training rolls out exactly what users sample.

- `simple_sigmas`: ComfyUI's `simple` scheduler over ModelSamplingDiscreteFlow (Z-Image-Turbo uses
  shift 3 through ModelSamplingAuraFlow; 8 steps give 1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0).
- `flux2_sigmas`: ComfyUI's `Flux2Scheduler` (resolution-dependent empirical mu).
- `rollout_sigmas`: which states a K-step training rollout visits for a given inference schedule.
  The official D-OPSD code trains Z-Image-Turbo on 4 states (t = 0, 100, 250, 500 of 1000, i.e.
  sigma 1.0, 0.9, 0.75, 0.5) while users sample 8 steps: every other sigma of the 8-step schedule.
"""
import math

import torch


def time_snr_shift(shift: float, t):
    """ComfyUI's shift for discrete-flow models: shift * t / (1 + (shift - 1) * t)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def discrete_flow_table(shift: float = 3.0, timesteps: int = 1000, multiplier: float = 1.0) -> torch.Tensor:
    """The sigma table of ComfyUI's ModelSamplingDiscreteFlow (multiplier 1 = ModelSamplingAuraFlow)."""
    ts = (torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier
    return time_snr_shift(shift, ts / multiplier)


def simple_sigmas(steps: int, shift: float = 3.0, timesteps: int = 1000, multiplier: float = 1.0) -> torch.Tensor:
    """ComfyUI `simple` scheduler: `steps` sigmas read evenly from the top of the table, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = discrete_flow_table(shift, timesteps, multiplier)
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]
    return torch.FloatTensor(sigmas)


def _flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """ComfyUI `Flux2Scheduler(steps, width, height)` (pixel width/height; 16x16 pixels per token)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mu = _flux2_empirical_mu(round(width * height / (16 * 16)), steps)
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def rollout_sigmas(inference_sigmas: torch.Tensor, train_steps: int) -> torch.Tensor:
    """The K state sigmas a training rollout visits, taken from the inference schedule.

    K == inference steps: every state the sampler visits (the paper's setting).
    K < inference steps: every (N/K)-th state from the top, as the official code's 4-of-8 list does;
    the Euler updates then jump between consecutive chosen sigmas.
    """
    states = torch.as_tensor(inference_sigmas, dtype=torch.float32)
    states = states[states > 0]
    n = len(states)
    if not 1 <= train_steps <= n:
        raise ValueError(f"train_steps must be between 1 and the schedule's {n} non-zero sigmas, got {train_steps}")
    if n % train_steps:
        raise ValueError(f"train_steps ({train_steps}) must divide the inference steps ({n}) so the rollout "
                         "stays on the inference schedule; pick a divisor or pass explicit sigmas")
    return states[:: n // train_steps].clone()


def sample_training_sigmas(batch: int, shift: float = 3.0, generator=None, device=None) -> torch.Tensor:
    """Sigmas for flow-matching SFT, drawn as ComfyUI's trainer does: u ~ U(0,1), sigma = shift(1 - u)."""
    u = torch.rand(batch, generator=generator, device=device)
    return time_snr_shift(shift, 1.0 - u)
