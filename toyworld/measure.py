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


def median3(images: torch.Tensor) -> torch.Tensor:
    """3x3 median filter (replicate padding), per channel: removes pixel noise, keeps step edges."""
    p = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    u = p.unfold(2, 3, 1).unfold(3, 3, 1)
    return u.reshape(*u.shape[:4], 9).median(-1).values


EDGE_THRESHOLD = 0.3   # gradient magnitude (RGB norm, images in [-1, 1]) that counts as an edge


def edge_strength(images: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> float:
    """Mean excess of the gradient magnitude over `threshold`, after two fixed 3x3 median filters.

    The median filters remove pixel noise before anything is measured, and the threshold ignores what noise they
    let through, so pixel noise does not make an image look sharper. Measured on 256 real renders of world version 2
    (tests/test_toyworld_measure.py): another real set 1.002; gaussian noise of std 0.05 / 0.1 / 0.2 / 0.4 gives
    0.94 / 0.87 / 0.77 / 0.82; a 3x3 box blur 0.41, and with noise 0.05 / 0.1 / 0.2 / 0.4 on top 0.40 / 0.38 /
    0.37 / 0.56 (only very heavy noise lifts a blurred image a little, never near 1). The plain edge energy
    (`sharpness`, mean |Laplacian|) rises with noise instead (2.1 / 3.3 / 5.8 / 10.9), which made speckled
    samples look sharp.
    """
    x = median3(median3(images))
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    g = (dx ** 2 + dy ** 2).sum(1).sqrt()
    return float(torch.nn.functional.relu(g - threshold).mean())


def denoised_sharpness(samples: torch.Tensor, real: torch.Tensor) -> float:
    """edge_strength of samples over that of real renders of the same prompts (1 = as sharp as real; blur and
    averaging lower it, pixel noise does not raise it)."""
    return edge_strength(samples) / edge_strength(real)


def bleed_rate(world: World, pred: torch.Tensor, prompts: PromptSet, axis: str, member: str) -> float:
    """Fraction of the prompts that do not name `axis` whose samples the evaluator reads as `member` (the new
    concept): how far the concept leaks into prompts that leave that attribute open (0 if none leave it open)."""
    col = AXIS_COL[axis]
    open_ = ~prompts.named[:, col]
    if not open_.any():
        return 0.0
    return float((pred[open_, col] == world.index(axis, member)).float().mean())


def noise_for(prompts: PromptSet, noise_seed: int) -> torch.Tensor:
    """The sampling noise of noise seed k for a prompt set: k = 0 is the set's own noise."""
    if noise_seed == 0:
        return prompts.noise
    g = torch.Generator().manual_seed(1_000_003 * noise_seed + len(prompts.captions))
    return torch.randn(prompts.noise.shape, generator=g)


def fd_floor(world: World, evaluator: Evaluator, prompts: PromptSet, draws: int = 3, seed: int = 900) -> List[float]:
    """FD between fresh real renders of the prompts (one per prompt, as many as a sample set) and the reference:
    what a perfect model scores at this sample size (the noise floor of every FD of that prompt set)."""
    g = torch.Generator().manual_seed(seed)
    return [frechet_distance(gaussian_stats(evaluator.embed(render_triples(world, prompts.triples, g))),
                             prompts.reference) for _ in range(draws)]


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
    out["denoised_sharpness"] = denoised_sharpness(samples, prompts.real)
    out["_pred"] = pred
    if concept_axis is not None:
        col = AXIS_COL[concept_axis]
        out["concept_acc"] = float((pred[:, col] == target[:, col]).float().mean())
        # the other attributes the trigger prompt names
        others = [c for c in range(3) if c != col]
        out["other_acc"] = float(hit[:, others].all(1).float().mean())
    return out
