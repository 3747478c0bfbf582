"""Training pairs: what the student sees (c_s), what the teacher sees (c_t), and the target latent."""
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Pair:
    caption: str
    student: list          # CONDITIONING from the prompt alone
    teacher: list          # CONDITIONING from prompt + target image
    latent: torch.Tensor   # VAE-space latent of the target image, [1, C, H, W]
    image: torch.Tensor    # the target image, [1, H, W, 3] in 0..1


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
                                 p.image.detach().clone())
    return [copies[id(p)] for p in pairs]
