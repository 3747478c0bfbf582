"""The tiny "VLM" encoder: word tokens, plus optional image patch tokens, -> hidden states.

Like the LLM/VLM encoders of Z-Image-Turbo or FLUX.2-klein, it maps a prompt (and, when given, an image) into
one token stream that the DiT cross-attends to. Text tokens come first, image patches after them; the
transformer is bidirectional, so with an image in the context the text tokens' hidden states change too.

Calling convention (what a ComfyUI CLIP wrapper uses):
    hidden = encoder(token_ids, images=None)        # [B, L (+ P), width]
    mask = encoder.context_mask(token_ids, images)  # [B, L (+ P)] bool, True = real token
The tokenizer is word-level over the world's vocabulary plus the reserved trigger words; unknown words map to
[unk]. Trigger words have embeddings that pre-training never updates (they never occur in its captions).
"""
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from .dit import sincos_2d

PAD, UNK = "[pad]", "[unk]"


class Tokenizer:
    def __init__(self, words: Sequence[str], max_len: int = 8):
        self.vocab: List[str] = [PAD, UNK] + list(words)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        ids = [self.ids.get(w, 1) for w in text.lower().split()][: self.max_len]
        return ids + [0] * (self.max_len - len(ids))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != 0)


@dataclass
class EncoderConfig:
    vocab_size: int = 40
    max_len: int = 8
    width: int = 96
    depth: int = 2
    heads: int = 4
    image_size: int = 32
    patch: int = 8
    channels: int = 3

    def to_dict(self):
        return asdict(self)


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, pad_mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ToyVLM(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.tok = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.max_len, w) * 0.02)
        n_patch = (cfg.image_size // cfg.patch) ** 2
        self.patch_in = nn.Linear(cfg.patch * cfg.patch * cfg.channels, w)
        self.register_buffer("image_pos", sincos_2d(cfg.image_size // cfg.patch, w), persistent=False)
        self.blocks = nn.ModuleList([EncoderBlock(w, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(w)

    @property
    def num_image_tokens(self) -> int:
        return (self.cfg.image_size // self.cfg.patch) ** 2

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.cfg.patch
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def context_mask(self, token_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                     image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """True for real tokens. image_mask [B] marks which rows' images are real (mixed batches)."""
        mask = token_ids != 0
        if images is not None:
            img = torch.ones(mask.shape[0], self.num_image_tokens, dtype=torch.bool, device=mask.device)
            if image_mask is not None:
                img = img & image_mask.to(mask.device)[:, None]
            mask = torch.cat([mask, img], dim=1)
        return mask

    def forward(self, token_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """image_mask [B] bool (optional): rows marked False ignore their image slots entirely, so their
        text hidden states equal those of a text-only call (mixed text / text+image batches)."""
        x = self.tok(token_ids) + self.text_pos[:, : token_ids.shape[1]]
        if images is not None:
            x = torch.cat([x, self.patch_in(self.patchify(images)) + self.image_pos], dim=1)
        pad = ~self.context_mask(token_ids, images, image_mask)
        # an all-padding row (empty prompt, no image) would make attention NaN: let it attend to slot 0
        pad = pad.clone()
        pad[pad.all(dim=1), 0] = False
        for blk in self.blocks:
            x = blk(x, pad)
        return self.norm(x)
