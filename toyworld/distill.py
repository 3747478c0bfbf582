"""Step distillation of the pre-trained model into a 4-step student: reflow + few-step distillation.

Method (Rectified Flow's "reflow then distil", Liu et al. 2022 / InstaFlow, Liu et al. 2023), one round:
1. The multi-step teacher (the pre-trained EMA model) integrates its probability-flow ODE with a
   `teacher_steps`-step Euler sampler from noise z to x0 = T(z, c), for text-only and text+image contexts
   drawn like pre-training's. That gives (z, x0, c) couplings.
2. The student, initialised from the teacher, regresses v = z - x0 on the straight line
   x_sigma = sigma*z + (1-sigma)*x0, at the 4 sigmas of the inference schedule (distillation to those steps)
   and, for a fraction of the rows, at uniform sigmas (keeps the field smooth between them).
Because each (z, c) has one target, the student's field has (nearly) straight paths and 4 Euler steps
land on sharp images, where the teacher's own 4-step samples are blurry averages.
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
from .pretrain import ema_update


@dataclass
class DistillConfig:
    pairs: int = 4096
    teacher_steps: int = 16
    teacher_cfg: float = 1.0
    steps: int = 600
    batch: int = 64
    lr: float = 2e-4
    ema: float = 0.99
    p_uniform_sigma: float = 0.25
    shift: float = 3.0
    student_steps: int = 4
    p_image: float = 0.5
    seed: int = 7

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
    """Train a student DiT (encoder shared and frozen); returns (student EMA dit, loss history)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    student = copy.deepcopy(teacher.dit).train()
    ema = copy.deepcopy(teacher.dit).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = schedules.simple_sigmas(cfg.student_steps, shift=cfg.shift)[:-1]
    n = len(couplings.captions)
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        idx = torch.randint(n, (cfg.batch,), generator=g)
        z, x0 = couplings.noise[idx], couplings.x0[idx]
        ctx, mask = teacher.encode([couplings.captions[i] for i in idx.tolist()], couplings.context_images[idx],
                                   couplings.has_image[idx])
        sigma = sched[torch.randint(len(sched), (cfg.batch,), generator=g)]
        uni = torch.rand(cfg.batch, generator=g) < cfg.p_uniform_sigma
        sigma = torch.where(uni, torch.rand(cfg.batch, generator=g).clamp(min=0.02), sigma)
        s = sigma[:, None, None, None]
        x_t = s * z + (1 - s) * x0
        loss = F.mse_loss(student(x_t, sigma, ctx, mask), z - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, min(cfg.ema, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"[distill] step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.time() - t0:.0f} s)")
    return ema, losses
