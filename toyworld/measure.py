"""The measurement protocol: fixed prompt sets and noises, samples, evaluator read-outs.

- Original prompts: seen (shape, colour, style) triples; we report attribute accuracy (does the sample show
  what the prompt asks for: retention) and the Frechet distance between the samples' evaluator features and
  those of real renders of the same triples (few-step quality).
- Trigger prompts: the concept axis filled with the trigger word; concept accuracy = fraction of samples the
  evaluator assigns to the held-out member on that axis; FD against real renders of the concept.
Prompts, noises and reference renders are pure functions of the seed, so every method and every checkpoint
is measured on exactly the same inputs.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .concepts import World, caption
from .dataset import Triple, concept_triples, labels, render_triples, sample_triples, trigger_caption
from .evaluator import Evaluator, attribute_accuracy, frechet_distance, gaussian_stats


@dataclass
class PromptSet:
    triples: List[Triple]
    captions: List[str]
    noise: torch.Tensor
    reference: tuple           # gaussian stats of real renders of `triples`
    real: torch.Tensor         # a few real renders (for pictures)


def _reference(world: World, evaluator: Evaluator, triples: Sequence[Triple], reps: int, g: torch.Generator):
    real = render_triples(world, list(triples) * reps, g)
    return gaussian_stats(evaluator.embed(real)), real[: len(triples)]


def original_prompts(world: World, evaluator: Evaluator, n: int = 512, seed: int = 100, reps: int = 4) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    triples = sample_triples(world, n, g, seen_only=True)
    caps = [caption(c, st, sh) for sh, c, st in triples]
    noise = torch.randn(n, 3, 32, 32, generator=g)
    ref, real = _reference(world, evaluator, triples, reps, g)
    return PromptSet(triples, caps, noise, ref, real)


def trigger_prompts(world: World, evaluator: Evaluator, axis: str, trigger: str, n: int = 256,
                    seed: int = 200, reps: int = 4, triples: Optional[Sequence[Triple]] = None) -> PromptSet:
    """n prompts with the trigger word; `triples` (e.g. the training captions' triples) are cycled when given,
    otherwise fresh combinations with the held-out member are drawn."""
    g = torch.Generator().manual_seed(seed)
    if triples:
        triples = [triples[i % len(triples)] for i in range(n)]
    else:
        triples = concept_triples(world, axis, n, g)
    caps = [trigger_caption(t, axis, trigger) for t in triples]
    noise = torch.randn(n, 3, 32, 32, generator=g)
    ref, real = _reference(world, evaluator, triples, reps, g)
    return PromptSet(list(triples), caps, noise, ref, real)


AXIS_COL = {"shape": 0, "colour": 1, "style": 2}


def read_samples(world: World, evaluator: Evaluator, samples: torch.Tensor, prompts: PromptSet,
                 concept_axis: Optional[str] = None) -> Dict[str, float]:
    pred = evaluator.predict(samples)
    target = labels(world, prompts.triples)
    out = {f"acc_{k}": v for k, v in attribute_accuracy(pred, target).items()}
    out["fd"] = frechet_distance(gaussian_stats(evaluator.embed(samples)), prompts.reference)
    if concept_axis is not None:
        col = AXIS_COL[concept_axis]
        out["concept_acc"] = float((pred[:, col] == target[:, col]).float().mean())
        # the other two attributes, as the trigger prompt asks for them
        others = [c for c in range(3) if c != col]
        out["other_acc"] = float((pred[:, others] == target[:, others]).all(1).float().mean())
    return out
