"""One training iteration for D-OPSD and for the two baselines it is compared against.

Each function takes velocity predictors `fn(x, sigma[B]) -> v` (the caller closes over conditioning and
the LoRA mode), runs its forward passes, calls backward() itself and returns the scalar loss. They never
step an optimizer, so gradient accumulation, clipping and AMP stay the training loop's business.

D-OPSD (paper eq. 1): the student rolls out its own few-step sampler from noise; at every visited state
x_k both the student (text context c_s) and the EMA teacher (text + target image context c_t) predict,
loss = mean_k || u_s(x_k) - sg(u_t(x_k)) ||^2.
Options the official code differs on: `loss_space="x0"` compares x0 = x_k - sigma_k * u (it weighs
early, high-noise steps more and converged faster there); `detach_states=True` cuts the graph between
steps (no backprop through the rollout) which also lets each step's graph be freed right after its
backward, so memory stays that of one forward/backward.
The student's forward at x_k is used twice: as the training forward and as the velocity of the Euler
update that produces x_{k+1}; no separate no-grad rollout pass is made. The teacher runs first at each
state, under no_grad, so its temporaries are gone before the student's graph is built; the per-step
backward gives the same gradient as the official code's single backward of the summed loss (the
states are detached there too) while keeping one graph alive instead of K.
"""
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .flow import add_noise, euler_step, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_SPACES = ("velocity", "x0")


@dataclass
class DOPSDOptions:
    loss_space: str = "velocity"            # paper: velocity; official code: x0
    loss_steps: Optional[Sequence[int]] = None  # rollout states that carry loss (None: all)
    detach_states: bool = True              # official code: detach x_k between steps

    def __post_init__(self):
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"loss_space must be one of {LOSS_SPACES}, got {self.loss_space!r}")


@dataclass
class StepResult:
    loss: float
    per_step: List[float] = field(default_factory=list)
    states: List[torch.Tensor] = field(default_factory=list)   # detached inputs the loss saw
    x0_estimate: Optional[torch.Tensor] = None                  # student's x0 at the last state


def _distance(pred_v, target_v, x, sigma, space: str) -> torch.Tensor:
    if space == "x0":
        pred, target = x0_from_velocity(x, sigma, pred_v), x0_from_velocity(x, sigma, target_v)
    else:
        pred, target = pred_v, target_v
    # the loss is always reduced in at least fp32, also when the forward ran in bf16
    up = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return F.mse_loss(pred.to(up), target.to(up))


def _sigma_tensor(sigmas, like: torch.Tensor) -> torch.Tensor:
    """Sigmas in fp32 (fp64 for fp64 inputs, so gradient checks stay exact), on the input's device."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.as_tensor(sigmas, device=like.device).to(dtype)


def _loss_indices(k_total: int, loss_steps) -> List[int]:
    if loss_steps is None:
        return list(range(k_total))
    idx = sorted({int(i) % k_total for i in loss_steps})
    if not idx:
        raise ValueError("loss_steps selects no rollout state")
    return idx


def dopsd_step(student_fn: VelocityFn, teacher_fn: VelocityFn, noise: torch.Tensor, state_sigmas: torch.Tensor,
               opts: DOPSDOptions = DOPSDOptions(), loss_scale: float = 1.0, backward: bool = True) -> StepResult:
    """Roll the student out from `noise` through `state_sigmas` (K states) and distil the teacher into it."""
    sig = _sigma_tensor(state_sigmas, noise)
    k_total, batch = len(sig), noise.shape[0]
    with_loss = set(_loss_indices(k_total, opts.loss_steps))
    n = len(with_loss)
    x = sig[0] * noise
    total, per_step, states = None, [], []
    x0_est = None
    for k in range(k_total):
        sigma = sig[k].expand(batch)
        x_in = x.detach() if opts.detach_states else x
        states.append(x_in.detach())
        if k in with_loss:
            with torch.no_grad():  # teacher first: its temporaries are freed before the student's graph exists
                v_t = teacher_fn(x_in.detach(), sigma)
            v_s = student_fn(x_in, sigma)
            loss_k = _distance(v_s, v_t, x_in.detach(), sigma, opts.loss_space) / n
            per_step.append(float(loss_k.detach()) * n)
            if opts.detach_states:
                if backward:
                    (loss_k * loss_scale).backward()
                total = loss_k.detach() if total is None else total + loss_k.detach()
            else:
                total = loss_k if total is None else total + loss_k
        else:
            with torch.no_grad():
                v_s = student_fn(x_in, sigma)
        if k + 1 < k_total:
            v_next = v_s.detach() if opts.detach_states else v_s
            x = euler_step(x_in, v_next, sig[k], sig[k + 1])
        else:
            x0_est = x0_from_velocity(x_in.detach(), sigma, v_s.detach())
    if not opts.detach_states and backward:
        (total * loss_scale).backward()
    return StepResult(float(total.detach()), per_step, states, x0_est)


def sft_step(student_fn: VelocityFn, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             opts: DOPSDOptions = DOPSDOptions(), loss_scale: float = 1.0, backward: bool = True) -> StepResult:
    """Vanilla flow-matching SFT on target images: || u_s(x_t) - (noise - x0) ||^2 at sigma [B]."""
    sigma = _sigma_tensor(sigma, x0).expand(x0.shape[0])
    x_t = add_noise(x0, noise, sigma)
    v = student_fn(x_t, sigma)
    loss = _distance(v, noise - x0, x_t, sigma, opts.loss_space)
    if backward:
        (loss * loss_scale).backward()
    return StepResult(float(loss.detach()), [float(loss.detach())], [x_t.detach()])


def off_policy_step(student_fn: VelocityFn, teacher_fn: VelocityFn, x0: torch.Tensor, noise: torch.Tensor,
                    state_sigmas: torch.Tensor, opts: DOPSDOptions = DOPSDOptions(), loss_scale: float = 1.0,
                    backward: bool = True) -> StepResult:
    """Teacher supervision on noised *target images* (the data distribution, not the student's rollout).

    Same states count, same teacher, same loss as dopsd_step; only where the states come from differs.
    """
    sig = _sigma_tensor(state_sigmas, x0)
    with_loss = _loss_indices(len(sig), opts.loss_steps)
    n, batch = len(with_loss), x0.shape[0]
    total, per_step, states = 0.0, [], []
    for k in with_loss:
        sigma = sig[k].expand(batch)
        x_t = add_noise(x0, noise, sigma)
        states.append(x_t.detach())
        with torch.no_grad():
            v_t = teacher_fn(x_t, sigma)
        v_s = student_fn(x_t, sigma)
        loss_k = _distance(v_s, v_t, x_t, sigma, opts.loss_space) / n
        if backward:
            (loss_k * loss_scale).backward()
        per_step.append(float(loss_k.detach()) * n)
        total += float(loss_k.detach())
    return StepResult(total, per_step, states)
