"""Training pairs: what the student sees (c_s), what the teacher sees (c_t), and the target latent.

A pair may carry several encoded captions (`variants`: the fields of an official JSONL row, and an empty
caption when the dataset asks for caption dropout). The teacher nodes encode them at graph time, because
conditioning is made there; the training step picks one per (epoch, example) (nodes/recipe_bridge.py).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch


@dataclass
class Pair:
    caption: str
    student: list          # CONDITIONING from the prompt alone
    teacher: list          # CONDITIONING from prompt + target image
    latent: torch.Tensor   # VAE-space latent of the target image, [1, C, H, W]
    image: torch.Tensor    # the target image, [1, H, W, 3] in 0..1
    teacher_prompt: Optional[str] = None   # the text the teacher encoded (None: the caption)
    variants: Tuple[tuple, ...] = ()       # (caption, student, teacher, teacher_prompt) per caption; "" = dropped
    caption_dropout: float = 0.0           # the dataset's dropout rate (the empty variant is in `variants`)


def make_pair(item: dict, latent, encode: Callable[[str], tuple]) -> Pair:
    """A Pair for a dataset item; encode(caption) -> (student, teacher, teacher_prompt). Encodes the item's
    main caption, each alternative caption (item["captions"]) and, with item["caption_dropout"] > 0, the
    empty caption; each distinct text once. `latent`: the target's latent, or a callable giving it after the
    captions are encoded (so the teacher encoder's own checks speak first)."""
    captions = list(dict.fromkeys([item["caption"], *item.get("captions", ())]))
    dropout = float(item.get("caption_dropout", 0.0) or 0.0)
    if dropout > 0 and "" not in captions:
        captions.append("")
    variants = tuple((c, *encode(c)) for c in captions)
    latent = latent() if callable(latent) else latent
    caption, student, teacher, teacher_prompt = variants[0]
    return Pair(caption, student, teacher, latent, item["image"], teacher_prompt,
                variants if len(variants) > 1 else (), dropout)


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    return x


def detached_copy(pairs: List[Pair]) -> List[Pair]:
    """Plain (non-inference) copies: tensors made in ComfyUI's executor are inference tensors, which
    autograd refuses to save. Must run outside torch.inference_mode. A pair that appears several times
    (kohya repeats) is copied once and stays one object."""
    copies = {}
    for p in pairs:
        if id(p) not in copies:
            copies[id(p)] = Pair(p.caption, _clone_tree(p.student), _clone_tree(p.teacher), p.latent.detach().clone(),
                                 p.image.detach().clone(), p.teacher_prompt, _clone_tree(p.variants),
                                 p.caption_dropout)
    return [copies[id(p)] for p in pairs]
