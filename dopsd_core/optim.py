"""Optimizer and learning-rate schedule for LoRA parameters.

AdamW is what the official D-OPSD scripts use (8-bit AdamW from bitsandbytes with --use-8bit-adam); the
official schedule is constant with no warm-up. Warm-up and cosine/linear decay are offered because short
LoRA runs on small datasets often like them; they are plain multipliers of the base lr.
"""
import math

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(params, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("optimizer 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes` into "
                               "ComfyUI's Python, or choose 'adamw'") from e
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant", min_factor: float = 0.0) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up, then the schedule."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(min_factor, 1.0 - progress * (1.0 - min_factor))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, total: int, warmup: int = 0, schedule: str = "constant", min_factor: float = 0.0):
    lr_factor(0, total, warmup, schedule, min_factor)  # validates the schedule name now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule, min_factor))
