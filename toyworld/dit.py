"""The tiny DiT: a flow-matching velocity model over 32x32 RGB pixels, cross-attending to the encoder.

Latent space = pixel space: x is [B, 3, 32, 32] in [-1, 1] (no autoencoder; the ComfyUI wrapper's "VAE" is the
identity map with a [-1,1] <-> [0,1] rescale). Conventions are ComfyUI's CONST flow (docs/architecture.md):
x_t = sigma*noise + (1-sigma)*x0, and the model predicts v = noise - x0.

    v = dit(x, sigma, context, context_mask=None)

Internally the network predicts x0 (F) and returns v = (x - F) / sigma. Big patches (8x8x3 = 192 values per
token) do not fit through a 128-wide stream, so a network that had to output the noise itself (v-prediction)
could not; with x0-prediction the noise part of v comes straight from x. The Euler step to sigma=0 then lands
exactly on F. `forward_x0` returns F itself.

Blocks are PixArt-style: self-attention over image patches, cross-attention to the context tokens, MLP, each
gated by adaLN-Zero modulation from the sigma embedding. Every projection is a plain nn.Linear, so
dopsd_core.lora hooks all of them (attention is written out, not nn.MultiheadAttention).
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


SIGMA_MIN = 1e-3  # v = (x - x0) / max(sigma, SIGMA_MIN); samplers never evaluate sigma = 0


@dataclass
class DiTConfig:
    image_size: int = 32
    patch: int = 8
    channels: int = 3
    width: int = 128
    depth: int = 4
    heads: int = 4
    context_dim: int = 96
    mlp_ratio: int = 3
    conv_mlp: bool = True   # depthwise 3x3 conv on the patch grid inside the MLP (local mixing; learns fast)
    pos_init: float = 0.5   # std of a learned per-patch embedding added to the fixed sin-cos one

    def to_dict(self):
        return asdict(self)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 * sigma (the timestep scale of ComfyUI's discrete-flow models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [1, grid*grid, dim] (half the channels per axis)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freqs[None], xs.reshape(-1, 1) * freqs[None]
    emb = torch.cat([torch.sin(ay), torch.cos(ay), torch.sin(ax), torch.cos(ax)], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))[None]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_dim or width, width)
        self.v = nn.Linear(kv_dim or width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, kv=None, kv_mask=None):
        kv = x if kv is None else kv
        b, n, w = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, w // h).transpose(1, 2)
        k = self.k(kv).reshape(b, kv.shape[1], h, w // h).transpose(1, 2)
        v = self.v(kv).reshape(b, kv.shape[1], h, w // h).transpose(1, 2)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, w))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False)
        self.attn = Attention(w, cfg.heads)
        self.norm2 = nn.LayerNorm(w)
        self.cross = Attention(w, cfg.heads, kv_dim=w)
        self.norm3 = nn.LayerNorm(w, elementwise_affine=False)
        self.mlp_in = nn.Linear(w, cfg.mlp_ratio * w)
        self.mlp_out = nn.Linear(cfg.mlp_ratio * w, w)
        self.grid = cfg.image_size // cfg.patch
        self.dw = (nn.Conv2d(cfg.mlp_ratio * w, cfg.mlp_ratio * w, 3, padding=1, groups=cfg.mlp_ratio * w)
                   if cfg.conv_mlp else None)
        self.ada = nn.Linear(w, 6 * w)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, temb, ctx, ctx_mask):
        s1, c1, g1, s2, c2, g2 = self.ada(temb)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + c1) + s1)
        x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        h = self.mlp_in(self.norm3(x) * (1 + c2) + s2)
        if self.dw is not None:
            b, n, c = h.shape
            grid = h.transpose(1, 2).reshape(b, c, self.grid, self.grid)
            h = h + self.dw(grid).reshape(b, c, n).transpose(1, 2)
        return x + g2 * self.mlp_out(F.gelu(h))


class ToyDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch
        self.grid = cfg.image_size // p
        self.patch_in = nn.Linear(p * p * cfg.channels, w)
        self.register_buffer("pos_fixed", sincos_2d(self.grid, w), persistent=False)
        self.pos_learned = nn.Parameter(torch.randn(1, self.grid * self.grid, w) * cfg.pos_init)
        self.t_in = nn.Linear(w, w)
        self.t_out = nn.Linear(w, w)
        self.ctx_in = nn.Linear(cfg.context_dim, w)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False)
        self.ada_out = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, p * p * cfg.channels)
        for m in (self.ada_out, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.cfg.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, t):
        b = t.shape[0]
        p, g, c = self.cfg.patch, self.grid, self.cfg.channels
        x = t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,3,H,W], sigma [B] in [0,1], context [B,L,context_dim], mask [B,L] (True = attend) -> v."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        x0 = self.forward_x0(x, sigma, context, context_mask)
        return (x - x0) / sigma.clamp(min=SIGMA_MIN)[:, None, None, None]

    def forward_x0(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.t_out(F.silu(self.t_in(sigma_embedding(sigma, self.cfg.width).to(x.dtype))))
        temb = F.silu(temb)
        ctx = self.ctx_in(context)
        if context_mask is not None:
            context_mask = context_mask.clone()
            context_mask[~context_mask.any(dim=1), 0] = True  # an empty context attends to its first slot
        h = self.patch_in(self.patchify(x)) + self.pos_fixed + self.pos_learned
        for blk in self.blocks:
            h = blk(h, temb, ctx, context_mask)
        shift, scale = self.ada_out(temb)[:, None].chunk(2, dim=-1)
        h = self.norm_out(h) * (1 + scale) + shift
        return self.unpatchify(self.out(h))
