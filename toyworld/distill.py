"""Step distillation of the pre-trained multi-step model into a 4-step student.

Two methods (`DistillConfig.method`):
- "dmd" (the default since world version 2): distribution matching in the style of DMD2 (Yin et al. 2024,
  "Improved Distribution Matching Distillation for Fast Image Synthesis"), with DMD's regression term (Yin et al.
  2023) for stability. The 4-step student starts as the teacher. Each step picks one of the 4 schedule states per
  row and reaches it by running the student's own sampler from noise (DMD2's backward simulation), predicts x0
  there, and moves that x0 along the difference of two scores of its noised copy: the frozen teacher's
  ("real") and a "fake" score model that keeps learning, by flow matching, the student's current outputs. The
  difference is the gradient of the KL divergence from the teacher's distribution to the student's, so the student
  matches a *distribution*: it is not pulled to the mean of the modes a few big steps cannot tell apart, which is
  what makes the teacher's own 4-step samples blurry. A small weight of the reflow regression below keeps the
  mapping anchored to the teacher's ODE. The GAN term of DMD2 is left out (budget: 2 CPU cores).
- "reflow" (world version 1): Rectified Flow's reflow then distil (Liu et al. 2022 / InstaFlow, 2023). The
  student regresses the straight-line velocity of teacher couplings at the schedule sigmas. It only straightens
  a path; where the teacher's few-step samples are averages, so are the student's.

Couplings: the multi-step teacher integrates its ODE with a `teacher_steps`-step Euler sampler from noise z to
x0 = T(z, c), for text-only and text+image contexts drawn like pre-training's.
"""
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from dopsd_core import sampler, schedules

from .concepts import World
from .dataset import pretrain_batch
from .model import ToyModel
from .pretrain import ema_update, flow_loss


@dataclass
class DistillConfig:
    method: str = "dmd"            # "dmd" | "reflow" (see the module docstring)
    pairs: int = 4096
    teacher_steps: int = 32
    teacher_cfg: float = 1.0
    steps: int = 500
    batch: int = 64
    lr: float = 2e-4
    ema: float = 0.99
    p_uniform_sigma: float = 0.25
    shift: float = 3.0
    student_steps: int = 4
    p_image: float = 0.5
    seed: int = 7
    regression_weight: float = 0.25   # dmd: weight of the reflow regression next to distribution matching
    fake_lr: float = 4e-4             # dmd: the fake score learns faster than the student (DMD2's two time-scale rule)
    fake_updates: int = 2             # dmd: fake-score updates per student update

    def to_dict(self):
        return asdict(self)


@dataclass
class Couplings:
    noise: torch.Tensor
    x0: torch.Tensor
    captions: List[str]
    context_images: torch.Tensor
    has_image: torch.Tensor


@torch.no_grad()
def make_couplings(world: World, teacher: ToyModel, cfg: DistillConfig,
                   log: Optional[Callable[[str], None]] = print) -> Couplings:
    g = torch.Generator().manual_seed(cfg.seed)
    sigmas = schedules.simple_sigmas(cfg.teacher_steps, shift=cfg.shift)
    chunk, out, t0 = 256, [], time.time()
    for i in range(0, cfg.pairs, chunk):
        n = min(chunk, cfg.pairs - i)
        b = pretrain_batch(world, n, g, p_image=cfg.p_image, p_empty=0.0)
        noise = torch.randn(n, 3, 32, 32, generator=g)
        ctx, mask = teacher.encode(b.captions, b.context_images, b.has_image)
        fn = teacher.velocity_fn(ctx, mask, cfg.teacher_cfg)
        x0 = sampler.sample_euler(fn, noise, sigmas).clamp(-1, 1)
        out.append((noise, x0, b.captions, b.context_images, b.has_image))
        if log:
            log(f"[distill] couplings {i + n}/{cfg.pairs} ({time.time() - t0:.0f} s)")
    return Couplings(torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]),
                     sum((o[2] for o in out), []), torch.cat([o[3] for o in out]), torch.cat([o[4] for o in out]))


def distill(teacher: ToyModel, couplings: Couplings, cfg: DistillConfig,
            log: Optional[Callable[[str], None]] = print):
    """Train a student DiT (encoder shared and frozen) with cfg.method; returns (student EMA dit, loss history)."""
    if cfg.method == "dmd":
        return distill_dmd(teacher, couplings, cfg, log)
    if cfg.method != "reflow":
        raise ValueError(f"unknown distillation method {cfg.method!r}; choose dmd or reflow")
    return distill_reflow(teacher, couplings, cfg, log)


def _reflow_loss(student, couplings: Couplings, idx, ctx, mask, sched, cfg: DistillConfig, g) -> torch.Tensor:
    """Velocity MSE on the straight line between a coupling's noise and its teacher sample, at the schedule sigmas
    (and, for p_uniform_sigma of the rows, a uniform sigma)."""
    z, x0 = couplings.noise[idx], couplings.x0[idx]
    b = len(idx)
    sigma = sched[torch.randint(len(sched), (b,), generator=g)]
    uni = torch.rand(b, generator=g) < cfg.p_uniform_sigma
    sigma = torch.where(uni, torch.rand(b, generator=g).clamp(min=0.02), sigma)
    s = sigma[:, None, None, None]
    return F.mse_loss(student(s * z + (1 - s) * x0, sigma, ctx, mask), z - x0)


def _draw(teacher: ToyModel, couplings: Couplings, cfg: DistillConfig, g):
    """A batch of coupling indices and their encoded contexts (text, or text + image)."""
    idx = torch.randint(len(couplings.captions), (cfg.batch,), generator=g)
    ctx, mask = teacher.encode([couplings.captions[i] for i in idx.tolist()], couplings.context_images[idx],
                               couplings.has_image[idx])
    return idx, ctx, mask


def _update(opt, module, loss):
    """One clipped optimizer step of `module` on `loss`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()


def _backward_simulation(student, z, ctx, mask, sched, k):
    """The state each row reaches after k[i] steps of the student's own Euler sampler from noise (no gradient)."""
    x, out = sched[0] * z, z.clone()
    with torch.no_grad():
        for j in range(int(k.max()) + 1):
            here = k == j
            out[here] = x[here]
            if j < int(k.max()):
                v = student(x, sched[j].expand(len(x)), ctx, mask)
                x = x + (sched[j + 1] - sched[j]) * v
    return out


def distill_dmd(teacher: ToyModel, couplings: Couplings, cfg: DistillConfig,
                log: Optional[Callable[[str], None]] = print):
    """Distribution matching (see the module docstring); returns (student EMA dit, loss history)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    real = teacher.dit.eval().requires_grad_(False)
    student = copy.deepcopy(real).train().requires_grad_(True)
    fake = copy.deepcopy(real).train().requires_grad_(True)
    ema = copy.deepcopy(real).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=cfg.fake_lr, betas=(0.9, 0.99))
    sched = schedules.simple_sigmas(cfg.student_steps, shift=cfg.shift)
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        idx, ctx, mask = _draw(teacher, couplings, cfg, g)
        z = torch.randn(couplings.noise[idx].shape, generator=g)
        k = torch.randint(cfg.student_steps, (cfg.batch,), generator=g)
        x_k = _backward_simulation(student, z, ctx, mask, sched, k)
        x0 = student.forward_x0(x_k, sched[k], ctx, mask)
        # the distribution-matching direction at a random noise level of the student's x0
        t = 0.02 + 0.96 * torch.rand(cfg.batch, generator=g)
        tt = t[:, None, None, None]
        x_t = tt * torch.randn(x0.shape, generator=g) + (1 - tt) * x0.detach()
        with torch.no_grad():
            x0_real = real.forward_x0(x_t, t, ctx, mask)
            x0_fake = fake.forward_x0(x_t, t, ctx, mask)
            scale = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)
            direction = (x0_fake - x0_real) / scale
        dm = 0.5 * F.mse_loss(x0, (x0 - direction).detach())
        reg = _reflow_loss(student, couplings, idx, ctx, mask, sched[:-1], cfg, g)
        _update(opt, student, dm + cfg.regression_weight * reg)
        ema_update(ema, student, min(cfg.ema, (1 + step) / (10 + step)))
        # the fake score follows the student's outputs (flow matching on them, as the teacher was trained on data)
        for _ in range(cfg.fake_updates):
            f_loss = flow_loss(fake, ctx, mask, x0.detach(), g, shift=cfg.shift)
            _update(opt_fake, fake, f_loss)
        losses.append(float(reg.detach()))
        if log and (step + 1) % max(1, cfg.steps // 10) == 0:
            log(f"[distill] dmd step {step + 1}/{cfg.steps} regression {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"fake {float(f_loss.detach()):.4f} ({time.time() - t0:.0f} s)")
    return ema, losses


def distill_reflow(teacher: ToyModel, couplings: Couplings, cfg: DistillConfig,
                   log: Optional[Callable[[str], None]] = print):
    """Reflow regression (see the module docstring); returns (student EMA dit, loss history)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    student = copy.deepcopy(teacher.dit).train().requires_grad_(True)
    ema = copy.deepcopy(teacher.dit).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = schedules.simple_sigmas(cfg.student_steps, shift=cfg.shift)[:-1]
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        idx, ctx, mask = _draw(teacher, couplings, cfg, g)
        loss = _reflow_loss(student, couplings, idx, ctx, mask, sched, cfg, g)
        _update(opt, student, loss)
        ema_update(ema, student, min(cfg.ema, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"[distill] step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.time() - t0:.0f} s)")
    return ema, losses
