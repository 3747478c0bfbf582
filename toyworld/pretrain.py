"""Multi-step flow-matching pre-training of the tiny VLM encoder + DiT (jointly, from scratch).

Each batch mixes text-only contexts and text+image contexts (see dataset.pretrain_batch); held-out concepts
never appear, neither as targets nor in contexts. Noise levels are logit-normal (SD3), the loss is the
ComfyUI-convention velocity MSE, and an EMA of the weights is what gets saved (the "teacher").
"""
import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .concepts import World
from .dataset import pretrain_batch
from .dit import ToyDiT
from .encoder import ToyVLM, Tokenizer


@dataclass
class PretrainConfig:
    steps: int = 5000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.995
    p_image: float = 0.5
    weighting: str = "x0"
    seed: int = 0

    def to_dict(self):
        return asdict(self)


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def encode(encoder: ToyVLM, tokenizer: Tokenizer, captions, images=None, has_image=None):
    ids = tokenizer(captions)
    if images is None:
        return encoder(ids), encoder.context_mask(ids)
    return encoder(ids, images, has_image), encoder.context_mask(ids, images, has_image)


def training_sigmas(b: int, generator, shift: float = 3.0, p_top: float = 0.1) -> torch.Tensor:
    """Logit-normal t (SD3), shifted like the inference schedule; a fraction p_top is drawn from [0.95, 1].

    The top band matters: there the prompt decides nearly everything (the image is almost pure noise), and a
    model never trained there extrapolates instead of predicting the conditional mean. Trained there, the
    model is a faithful multi-step model: many small steps resolve the choice between modes, while a few big
    steps average them (the few-step failure that step distillation removes).
    """
    t = torch.sigmoid(torch.randn(b, generator=generator))
    sigma = shift * t / (1 + (shift - 1) * t)
    top = torch.rand(b, generator=generator) < p_top
    return torch.where(top, 0.95 + 0.05 * torch.rand(b, generator=generator), sigma)


def flow_loss(dit, ctx, mask, x0, generator, shift: float = 3.0, weighting: str = "x0"):
    """Flow-matching loss. weighting "v": velocity MSE (= x0 error / sigma^2); "x0": x0 MSE, which gives the
    high-noise states, where layout and shape are decided from the prompt alone, a fair share of the gradient."""
    b = x0.shape[0]
    sigma = training_sigmas(b, generator, shift)
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma[:, None, None, None]
    x_t = s * noise + (1 - s) * x0
    if weighting == "v":
        return F.mse_loss(dit(x_t, sigma, ctx, mask), noise - x0)
    err = (dit.forward_x0(x_t, sigma, ctx, mask) - x0).pow(2).mean(dim=(1, 2, 3))
    if weighting == "x0":
        return err.mean()
    if weighting == "x0_over_sigma":   # between the two: 1/sigma
        return (err / sigma.clamp(min=0.05)).mean()
    raise ValueError(f"unknown loss weighting {weighting!r}")


@torch.no_grad()
def ema_update(ema_model, model, decay):
    for pe, p in zip(ema_model.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)


def pretrain(world: World, encoder: ToyVLM, dit: ToyDiT, tokenizer: Tokenizer, cfg: PretrainConfig,
             log: Optional[Callable[[str], None]] = print):
    """Train encoder + dit in place; returns the EMA copies (encoder_ema, dit_ema) and the loss history."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = list(encoder.parameters()) + list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    enc_ema, dit_ema = copy.deepcopy(encoder).eval(), copy.deepcopy(dit).eval()
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        b = pretrain_batch(world, cfg.batch, g, p_image=cfg.p_image)
        ctx, mask = encode(encoder, tokenizer, b.captions, b.context_images, b.has_image)
        loss = flow_loss(dit, ctx, mask, b.x0, g, weighting=cfg.weighting)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        ema_update(enc_ema, encoder, decay)
        ema_update(dit_ema, dit, decay)
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, cfg.steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"[pretrain] step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.time() - t0:.0f} s)")
    return enc_ema, dit_ema, losses
