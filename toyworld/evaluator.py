"""The measuring instrument: a small CNN trained on procedural renders of *every* concept (held-out included).

Heads classify shape, colour and style; the 64-d penultimate features define a Frechet distance (an FID
with this network in place of Inception). Training uses light corruption (noise, blur) so that the
classifier still reads imperfect samples, but it is never trained on model samples.
"""
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .concepts import World
from .dataset import labels, render_triples, sample_triples

FEATURE_DIM = 64


@dataclass
class EvaluatorConfig:
    steps: int = 2500
    batch: int = 128
    lr: float = 2e-3
    seed: int = 1234

    def to_dict(self):
        return asdict(self)


class Evaluator(nn.Module):
    def __init__(self, n_shapes: int, n_colours: int, n_styles: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 24, 4, stride=2, padding=1), nn.GELU(),       # 16x16
            nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.GELU(),      # 8x8
            nn.Conv2d(32, 48, 3, stride=1, padding=1), nn.GELU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.GELU(),      # 4x4
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.GELU())
        self.heads = nn.ModuleDict({"shape": nn.Linear(FEATURE_DIM, n_shapes),
                                    "colour": nn.Linear(FEATURE_DIM, n_colours),
                                    "style": nn.Linear(FEATURE_DIM, n_styles)})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """[B, 3] predicted (shape, colour, style) indices."""
        out = []
        for i in range(0, len(x), batch):
            logits = self(x[i:i + batch])
            out.append(torch.stack([logits[k].argmax(1) for k in ("shape", "colour", "style")], dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat([self.features(x[i:i + batch]) for i in range(0, len(x), batch)])


def corrupt(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training-time corruption: per-image gaussian noise (std 0..0.15) and, for a third, a 3x3 box blur."""
    b = x.shape[0]
    std = 0.15 * torch.rand(b, 1, 1, 1, generator=generator)
    x = x + std * torch.randn(x.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.33
    if blur.any():
        k = torch.ones(3, 1, 3, 3) / 9.0
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x


def train_evaluator(world: World, cfg: EvaluatorConfig, log: Optional[Callable[[str], None]] = print) -> Evaluator:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = Evaluator(len(world.shapes), len(world.colours), len(world.styles))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        triples = sample_triples(world, cfg.batch, g, seen_only=False)
        x = corrupt(render_triples(world, triples, g), g)
        y = labels(world, triples)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], y[:, i]) for i, k in enumerate(("shape", "colour", "style")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"[evaluator] step {step + 1}/{cfg.steps} loss {float(loss):.3f} ({time.time() - t0:.0f} s)")
    return net.eval()


# -- metrics -----------------------------------------------------------------------------------------------

def attribute_accuracy(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """Per-axis accuracy and the all-three-correct rate; pred/target [B, 3]."""
    hit = pred == target
    return {"shape": float(hit[:, 0].float().mean()), "colour": float(hit[:, 1].float().mean()),
            "style": float(hit[:, 2].float().mean()), "all": float(hit.all(1).float().mean())}


def gaussian_stats(feats: torch.Tensor):
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(stats_a, stats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(A + B - 2 (A^1/2 B A^1/2)^1/2) (symmetric form, eigen-decomposition only)."""
    mu_a, cov_a = stats_a
    mu_b, cov_b = stats_b
    sa = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(sa @ cov_b @ sa)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))
