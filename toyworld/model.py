"""A text(-and-image)-to-image model of the toy world: tokenizer + tiny VLM encoder + tiny DiT.

`ToyModel` bundles the three so that every caller (pre-training, distillation, the experiment, the ComfyUI
wrapper) conditions and samples the same way:
    ctx, mask = model.encode(captions, images=None)
    fn = model.velocity_fn(ctx, mask)         # fn(x, sigma[B]) -> v, ComfyUI CONST convention
    x0 = model.sample(captions, noise, sigmas, images=None, cfg=1.0)
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dopsd_core import sampler

from .dit import ToyDiT
from .encoder import ToyVLM, Tokenizer


@dataclass
class ToyModel:
    tokenizer: Tokenizer
    encoder: ToyVLM
    dit: ToyDiT

    @torch.no_grad()
    def encode(self, captions: Sequence[str], images: Optional[torch.Tensor] = None,
               has_image: Optional[torch.Tensor] = None):
        """Context [B, L(+P), width] and mask [B, L(+P)]; the encoder is frozen outside pre-training."""
        ids = self.tokenizer(list(captions))
        return self.encoder(ids, images, has_image), self.encoder.context_mask(ids, images, has_image)

    def velocity_fn(self, ctx: torch.Tensor, mask: torch.Tensor, cfg: float = 1.0,
                    uncond: Optional[tuple] = None):
        """fn(x, sigma) -> v. With cfg != 1, `uncond` = (ctx, mask) of the empty prompt (broadcast to B)."""
        dit = self.dit
        if cfg == 1.0:
            return lambda x, sigma: dit(x, sigma, ctx, mask)
        if uncond is None:
            uncond = self.encode([""] * ctx.shape[0])
        u_ctx, u_mask = uncond

        def guided(x, sigma):
            b = x.shape[0]
            v_c = dit(x, sigma, ctx, mask)
            v_u = dit(x, sigma, u_ctx.expand(b, -1, -1), u_mask.expand(b, -1))
            return v_u + cfg * (v_c - v_u)
        return guided

    @torch.no_grad()
    def sample(self, captions: Sequence[str], noise: torch.Tensor, sigmas: torch.Tensor,
               images: Optional[torch.Tensor] = None, cfg: float = 1.0, batch: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch):
            sl = slice(i, i + batch)
            ctx, mask = self.encode(captions[sl], None if images is None else images[sl])
            out.append(sampler.sample_euler(self.velocity_fn(ctx, mask, cfg), noise[sl], sigmas))
        return torch.cat(out)

    def eval(self):
        self.encoder.eval()
        self.dit.eval()
        return self
