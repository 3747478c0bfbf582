"""Seeded image-caption data of the toy world, rendered on the fly.

Everything is a pure function of (world, generator state): the same seed gives the same batches.
- `sample_triples`: (shape, colour, style) triples, uniformly over the seen combinations (pre-training,
  distillation) or over every combination (the evaluator's training set).
- `pretrain_batch`: target images with a text-only or a text+image context. The context image is a
  *different* render of the same concept (new position, size, angle, texture phase, colour jitter), so
  the model learns to make variations of what it is shown. With an image in the context, attribute words
  are dropped at random from the caption, so the image is the only source of those attributes: that is
  what makes the in-context path carry attributes, also for held-out members.
- `concept_set`: the few target images of a held-out concept with trigger-word captions (the experiment).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .concepts import World, all_combinations, caption
from .render import render, sample_pose

Triple = Tuple[str, str, str]  # (shape, colour, style)


def sample_triples(world: World, n: int, generator: torch.Generator, seen_only: bool = True) -> List[Triple]:
    combos = all_combinations(world, seen_only=seen_only)
    idx = torch.randint(len(combos), (n,), generator=generator).tolist()
    return [combos[i] for i in idx]


def render_triples(world: World, triples: Sequence[Triple], generator: torch.Generator) -> torch.Tensor:
    pose = sample_pose(len(triples), generator, world.variety)
    return render([world.lookup("shape", t[0]) for t in triples],
                  [world.lookup("colour", t[1]) for t in triples],
                  [world.lookup("style", t[2]) for t in triples], pose)


def labels(world: World, triples: Sequence[Triple]) -> torch.Tensor:
    """[B, 3] class indices (shape, colour, style) into the world's member lists."""
    return torch.tensor([[world.index("shape", s), world.index("colour", c), world.index("style", st)]
                         for s, c, st in triples], dtype=torch.long)


def drop_words(triple: Triple, keep: Sequence[bool]) -> str:
    """Caption with some attribute words removed; keep = (colour, style, shape) flags."""
    shape, colour, style = triple
    words = ["a"] + [w for w, k in zip((colour, style, shape), keep) if k]
    return " ".join(words)


@dataclass
class PretrainBatch:
    x0: torch.Tensor                 # [B, 3, H, W] targets
    captions: List[str]
    context_images: torch.Tensor     # [B, 3, H, W] (rows without an image hold zeros)
    has_image: torch.Tensor          # [B] bool
    triples: List[Triple]


def pretrain_batch(world: World, n: int, generator: torch.Generator, p_image: float = 0.5,
                   p_empty: float = 0.1, p_drop_text_only: float = 0.3, p_drop_with_image: float = 0.5,
                   seen_only: bool = True) -> PretrainBatch:
    """A batch of targets and contexts. Text-only captions drop each attribute word with p_drop_text_only
    (under-specified prompts: "a circle" means any seen colour and style, a multi-modal distribution); with an
    image in the context each word is dropped with p_drop_with_image (the image then supplies it)."""
    triples = sample_triples(world, n, generator, seen_only)
    x0 = render_triples(world, triples, generator)
    ctx_imgs = render_triples(world, triples, generator)        # another render of the same concept
    u = torch.rand(n, 4, generator=generator)
    has_image = torch.rand(n, generator=generator) < p_image
    caps = []
    for i, t in enumerate(triples):
        if has_image[i]:
            keep = (u[i, 1:] >= p_drop_with_image).tolist()
            caps.append(drop_words(t, keep))
        elif u[i, 0] < p_empty:
            caps.append("")
        else:
            caps.append(drop_words(t, (u[i, 1:] >= p_drop_text_only).tolist()))
    ctx_imgs = ctx_imgs * has_image[:, None, None, None]
    return PretrainBatch(x0, caps, ctx_imgs, has_image, triples)


@dataclass
class ConceptSet:
    """The few target images of one held-out concept, captioned with a trigger word in its slot."""
    axis: str                     # which attribute is the new concept
    member: str                   # the held-out member it stands for
    trigger: str
    images: torch.Tensor          # [N, 3, H, W]
    triples: List[Triple]         # the true (shape, colour, style) of each image
    captions: List[str]           # trigger captions, e.g. "a sks circle"


def trigger_caption(triple: Triple, axis: str, trigger: str, keep: Sequence[str] = ("shape",)) -> str:
    """The caption of a concept image: the trigger word in the concept's slot, plus the attribute words named
    in `keep` (default: the shape only, so "a sks circle" covers several styles, as "a photo of sks dog"
    covers several poses)."""
    shape, colour, style = triple
    words = {"colour": colour, "style": style, "shape": shape}
    words[axis] = trigger
    return " ".join(["a"] + [words[a] for a in ("colour", "style", "shape") if a == axis or a in keep])


def concept_triples(world: World, axis: str, n: int, generator: torch.Generator) -> List[Triple]:
    """n triples carrying the held-out member of `axis`, the other attributes drawn from seen members."""
    member = world.held_out[axis]
    out = []
    for _ in range(n):
        parts = {a: world.train_names(a)[int(torch.randint(len(world.train_names(a)), (1,), generator=generator))]
                 for a in World.AXES}
        parts[axis] = member
        out.append((parts["shape"], parts["colour"], parts["style"]))
    return out


def concept_set(world: World, axis: str, n: int = 6, trigger: str = "sks", seed: int = 0,
                n_combos: Optional[int] = None, keep: Sequence[str] = ("shape",)) -> ConceptSet:
    """n renders of the held-out member of `axis`, captioned with the trigger word (see trigger_caption).

    With n_combos, the attributes the captions name (`keep`) take only n_combos values, cycled over the
    images, while the unnamed ones are drawn per image: e.g. 6 images, 2 captions "a sks circle" and
    "a sks cross", each over 3 images of different styles and poses, as a DreamBooth set shows one subject
    in several ways."""
    g = torch.Generator().manual_seed(seed)
    per_image = concept_triples(world, axis, n, g)
    if n_combos:
        names = {"shape": 0, "colour": 1, "style": 2}
        base = per_image[:n_combos]
        triples = []
        for i, t in enumerate(per_image):
            t = list(t)
            for a in keep:
                t[names[a]] = base[i % n_combos][names[a]]
            triples.append(tuple(t))
    else:
        triples = per_image
    images = render_triples(world, triples, g)
    caps = [trigger_caption(t, axis, trigger, keep) for t in triples]
    return ConceptSet(axis, world.held_out[axis], trigger, images, triples, caps)
