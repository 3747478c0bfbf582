"""The measurement protocol: fixed prompt sets and noises, samples, evaluator read-outs.

- Original prompts: seen (shape, colour, style) triples, captioned like pre-training's text-only prompts: the
  shape always, colour and style words each with probability 1/2 ("a circle", "a red striped circle", ...).
  We report the accuracy of the attributes the prompt names (retention) and the Frechet distance between
  the samples' evaluator features and those of real renders of the same triples (few-step quality; for an
  unnamed attribute the reference holds uniformly drawn seen members, which is what the prompt means).
- Trigger prompts: the concept axis filled with the trigger word; concept accuracy = fraction of samples the
  evaluator assigns to the held-out member on that axis; FD against real renders of the concept.
Prompts, noises and reference renders are pure functions of the seed, so every method and every checkpoint
is measured on exactly the same inputs.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .concepts import World
from .dataset import Triple, concept_triples, drop_words, labels, render_triples, sample_triples, trigger_caption
from .evaluator import Evaluator, frechet_distance, gaussian_stats


@dataclass
class PromptSet:
    triples: List[Triple]
    captions: List[str]
    noise: torch.Tensor
    reference: tuple           # gaussian stats of real renders of `triples`
    real: torch.Tensor         # a few real renders (for pictures)
    named: torch.Tensor        # [B, 3] bool: which of (shape, colour, style) the caption names


def _reference(world: World, evaluator: Evaluator, triples: Sequence[Triple], reps: int, g: torch.Generator):
    real = render_triples(world, list(triples) * reps, g)
    return gaussian_stats(evaluator.embed(real)), real[: len(triples)]


def original_prompts(world: World, evaluator: Evaluator, n: int = 512, seed: int = 100, reps: int = 4,
                     p_name: float = 0.5) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    triples = sample_triples(world, n, g, seen_only=True)
    named = torch.ones(n, 3, dtype=torch.bool)
    named[:, 1:] = torch.rand(n, 2, generator=g) < p_name
    caps = [drop_words(t, (bool(k[1]), bool(k[2]), True)) for t, k in zip(triples, named)]
    noise = torch.randn(n, 3, 32, 32, generator=g)
    ref, real = _reference(world, evaluator, triples, reps, g)
    return PromptSet(triples, caps, noise, ref, real, named)


def trigger_prompts(world: World, evaluator: Evaluator, axis: str, trigger: str, n: int = 256,
                    seed: int = 200, reps: int = 4, triples: Optional[Sequence[Triple]] = None,
                    keep: Sequence[str] = ("shape",)) -> PromptSet:
    """n prompts with the trigger word; `triples` (e.g. the training captions' triples) are cycled when given,
    otherwise fresh combinations with the held-out member are drawn."""
    g = torch.Generator().manual_seed(seed)
    if triples:
        triples = [triples[i % len(triples)] for i in range(n)]
    else:
        triples = concept_triples(world, axis, n, g)
    caps = [trigger_caption(t, axis, trigger, keep) for t in triples]
    noise = torch.randn(n, 3, 32, 32, generator=g)
    ref, real = _reference(world, evaluator, triples, reps, g)
    named = torch.tensor([[a == axis or a in keep for a in ("shape", "colour", "style")]] * n)
    return PromptSet(list(triples), caps, noise, ref, real, named)


AXIS_COL = {"shape": 0, "colour": 1, "style": 2}


def edge_energy(images: torch.Tensor) -> float:
    """Mean absolute 3x3 Laplacian: how much fine detail (edges, stripes, dots) the images hold."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(images.shape[1], 1, 3, 3)
    return float(torch.nn.functional.conv2d(images.float(), k, groups=images.shape[1]).abs().mean())


def sharpness(samples: torch.Tensor, real: torch.Tensor) -> float:
    """Edge energy of samples over that of real renders of the same prompts: a colour-blind few-step quality
    read-out (blurry few-step samples, the failure SFT causes in the paper, score well below 1)."""
    return edge_energy(samples) / edge_energy(real)


def read_samples(world: World, evaluator: Evaluator, samples: torch.Tensor, prompts: PromptSet,
                 concept_axis: Optional[str] = None) -> Dict[str, float]:
    pred = evaluator.predict(samples)
    target = labels(world, prompts.triples)
    hit = (pred == target) | ~prompts.named
    out = {f"acc_{k}": float(hit[:, i][prompts.named[:, i]].float().mean()) if prompts.named[:, i].any() else 1.0
           for i, k in enumerate(("shape", "colour", "style"))}
    out["acc_all"] = float(hit.all(1).float().mean())   # every attribute the prompt names is right
    out["fd"] = frechet_distance(gaussian_stats(evaluator.embed(samples)), prompts.reference)
    out["sharpness"] = sharpness(samples, prompts.real)
    if concept_axis is not None:
        col = AXIS_COL[concept_axis]
        out["concept_acc"] = float((pred[:, col] == target[:, col]).float().mean())
        # the other attributes the trigger prompt names
        others = [c for c in range(3) if c != col]
        out["other_acc"] = float(hit[:, others].all(1).float().mean())
    return out
