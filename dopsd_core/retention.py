"""On-policy retention: keep what the base model does on ordinary prompts while D-OPSD teaches a concept.

A LoRA taught "sks = this colour" from a few images finds that the cheapest change is to shift *every* prompt
towards it (colour bleed). Retention adds examples of ordinary prompts (a user list, the class prompt, which is
the training captions with the trigger word removed, and generated variations of them) trained with the same
D-OPSD loss along the student's own few-step rollout, but with the frozen base model (LoRA off, text-only
conditioning) as the teacher: on those prompts the student is pulled back to what it drew before training.

Mixing: each micro-step runs its concept example as usual and, with probability `ratio`, also a retention
batch; both gradients land in the same optimizer step (loss = concept + retention), so the retention term acts
as a constraint on every update it joins rather than as a separate step that the next concept step undoes. The
student's budget grows by a factor 1 + ratio on average (print it next to any comparison). Ratio 0 is the
paper's method, bit for bit; ratio 1 adds the term to every step. The very first micro-step never draws one:
on the untouched (zero) LoRA the retention loss is exactly 0.

The draws are a pure function of (seed, micro-step position), never of a shared generator, so a resumed run
draws exactly what the uninterrupted one did once `seek(position)` is set (RetentionMix.seek_step), provided it
mixes with the same settings: `RetentionMix.settings()` goes into the exact-resume state (the Trainer's
`extras["retention"]`) and `resume_mismatch` says how a resumed run's settings differ from the checkpoint's.

Measured in the toy world: toyworld/README.md and the README's "Toy-world results".
"""
import re
from typing import Callable, List, Optional, Sequence

import torch

from .objectives import StepResult

# Variations of a class prompt for generic (photographic) models: the same subject in other settings. Each
# template holds one "{}" for the prompt. The toy world passes its own (attribute words).
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "{}, close-up", "{} in the background", "a painting of {}",
                     "{} outdoors", "{} on a table", "a drawing of {}", "{}, wide shot", "two of {}")


def remove_trigger(caption: str, trigger: str) -> str:
    """`caption` without the whole word `trigger` (case-insensitive), spaces collapsed: the class prompt.
    "a photo of sks dog" -> "a photo of dog"; "a sks, red cat" -> "a red cat"."""
    if not trigger.strip():
        return " ".join(caption.split())
    text = re.sub(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)[,;:]?", " ", caption, flags=re.IGNORECASE)
    return " ".join(text.split())


def class_prompts(captions: Sequence[str], trigger: str) -> List[str]:
    """The distinct training captions with the trigger word removed, in first-seen order (empty ones dropped)."""
    out: List[str] = []
    for c in captions:
        p = remove_trigger(c, trigger)
        if p and p not in out:
            out.append(p)
    return out


def variations(prompts: Sequence[str], n: int, seed: int = 0,
               templates: Sequence[str] = DEFAULT_TEMPLATES) -> List[str]:
    """n prompts drawn (seeded, without repeats while possible) from templates x prompts; "{}" is the prompt."""
    if n <= 0 or not prompts:
        return []
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"variation templates need a '{{}}' for the prompt: {bad[:3]}")
    pool = [t.format(p) for p in prompts for t in templates]
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(pool), generator=g).tolist()
    return [pool[order[i % len(pool)]] for i in range(n)]


def retention_prompts(prompts: Sequence[str] = (), captions: Sequence[str] = (), trigger: str = "",
                      n_variations: int = 0, seed: int = 0, templates: Sequence[str] = DEFAULT_TEMPLATES) -> List[str]:
    """The retention set: the user's prompts, the class prompts of `captions`, and n_variations variations of
    both, deduplicated in that order. Prompts that still contain the trigger are refused (they would teach the
    student to forget the concept)."""
    base: List[str] = []
    for p in list(prompts) + class_prompts(captions, trigger):
        p = " ".join(str(p).split())
        if p and p not in base:
            base.append(p)
    out = list(base)
    for v in variations(base, n_variations, seed, templates):
        if v not in out:
            out.append(v)
    if trigger.strip():
        leaked = [p for p in out if remove_trigger(p, trigger) != p]
        if leaked:
            raise ValueError(f"retention prompts must not name the trigger word {trigger!r}: {leaked[:3]}; "
                             "remove it from those prompts (the class prompt is derived without it)")
    return out


def _position_seed(seed: int, position: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(position) + 1) % (2 ** 63 - 1)


def draw(seed: int, position: int, ratio: float, n_prompts: int, per_step: int = 1) -> Optional[List[int]]:
    """The retention draw of micro-step `position`: None (a concept step) or `per_step` prompt indices.
    Position 0 is always a concept step (see the module docstring)."""
    if ratio <= 0 or n_prompts <= 0 or position <= 0:
        return None
    g = torch.Generator().manual_seed(_position_seed(seed, position))
    if float(torch.rand((), generator=g)) >= ratio:
        return None
    return torch.randint(n_prompts, (per_step,), generator=g).tolist()


RunRetention = Callable[[int, List[int], Callable], object]


class RetentionMix:
    """A TrainTask wrapper (dopsd_core.train.TrainTask) that adds a retention batch to a `ratio` of the
    micro-steps. The data order stays the wrapped task's; after the concept example the order drew,
    `run_retention(index, prompt_indices, compute)` (the host's) runs the drawn retention prompts at that
    example's size with `net.predictors(student_fn, base_fn, teacher_mode="off")` through `compute`, i.e. the
    Trainer's D-OPSD step (its own backward, the same loss scale). The micro-step's loss is the sum.
    Only method "dopsd" makes sense (SFT/off-policy would not roll the student out).

    `prompts` (optional): the retention prompts' texts, in index order. They only go into settings(), so that a
    resume can tell other prompts from the checkpoint's; a host without texts leaves it empty.
    """

    def __init__(self, task, n_prompts: int, ratio: float, seed: int, run_retention: RunRetention,
                 per_step: int = 1, prompts: Sequence[str] = ()):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"retention ratio must be in [0, 1], got {ratio}")
        if n_prompts < 1:
            raise ValueError("retention needs at least one prompt")
        if prompts and len(prompts) != n_prompts:
            raise ValueError(f"{len(prompts)} retention prompt texts for n_prompts {n_prompts}")
        self.task, self.n_prompts, self.ratio, self.seed = task, n_prompts, float(ratio), int(seed)
        self.prompts = [str(p) for p in prompts]
        self.run_retention, self.per_step = run_retention, per_step
        self.position = 0                      # micro-steps run so far
        self.log: List[Optional[List[int]]] = []   # the draws of this process (tests, diagnostics)

    def __len__(self):
        return len(self.task)

    def bucket(self, index):
        return self.task.bucket(index) if hasattr(self.task, "bucket") else 0

    def settings(self) -> dict:
        """Everything that decides which retention examples this mix adds, as plain values for the exact-resume
        state (a resumed run compares them with resume_mismatch): ratio, seed, per_step, n_prompts, prompts."""
        return {"ratio": self.ratio, "seed": self.seed, "per_step": int(self.per_step),
                "n_prompts": int(self.n_prompts), "prompts": list(self.prompts)}

    def seek(self, position: int):
        self.position = int(position)

    def seek_step(self, step: int, grad_accum: int = 1):
        """After a resume at optimizer step `step`: continue the draw sequence where the run left off."""
        self.seek(int(step) * int(grad_accum))

    def next_draw(self) -> Optional[List[int]]:
        d = draw(self.seed, self.position, self.ratio, self.n_prompts, self.per_step)
        self.position += 1
        self.log.append(d)
        return d

    def after(self, concept, compute) -> Optional[StepResult]:
        """Draw for this micro-step and, when drawn, run the retention prompts through `compute` at the size of
        `concept` (what the host's run_retention takes: an example index or the example itself); None when not
        drawn. The host calls it once per micro-step, after the concept example."""
        d = self.next_draw()
        return None if d is None else self.run_retention(concept, d, compute)

    def run(self, index, compute):
        result = self.task.run(index, compute)
        kept = self.after(index, compute)
        if kept is None:
            return result
        return StepResult(result.loss + kept.loss, list(result.per_step) + list(kept.per_step),
                          list(result.states), result.x0_estimate)


def schedule(seed: int, ratio: float, n_prompts: int, micro_steps: int, per_step: int = 1) -> List[Optional[List[int]]]:
    """The draws of micro-steps 0..micro_steps-1 (what a RetentionMix with these settings will do)."""
    return [draw(seed, i, ratio, n_prompts, per_step) for i in range(micro_steps)]


def describe(settings: Optional[dict]) -> str:
    """A RetentionMix.settings() (None: no retention) in words, e.g. "retention ratio 0.5 and 5 retention
    prompts ('a photo of a dog', 'a red car', ...)"."""
    if settings is None:
        return "no retention"
    texts = list(settings.get("prompts") or [])
    shown = ", ".join(repr(t) for t in texts[:2]) + (", ..." if len(texts) > 2 else "")
    return (f"retention ratio {settings['ratio']:g} and {settings['n_prompts']} retention prompts"
            + (f" ({shown})" if shown else ""))


def resume_mismatch(saved: Optional[dict], current: Optional[dict]) -> Optional[str]:
    """Why a run resumed with retention `current` does not continue a checkpoint trained with `saved` (both
    RetentionMix.settings() or None for no retention) as the uninterrupted run would; None when they agree.
    The sentence names both settings and what differs; the host adds how to fix it in its own terms."""
    if saved == current:
        return None
    if saved is None or current is None:
        return f"the checkpoint was trained with {describe(saved)}; this run has {describe(current)}"
    what = []
    if float(saved["ratio"]) != float(current["ratio"]):
        what.append(f"ratio {saved['ratio']:g} -> {current['ratio']:g}")
    old, new = list(saved.get("prompts") or []), list(current.get("prompts") or [])
    if int(saved["n_prompts"]) != int(current["n_prompts"]) or old != new:
        added, gone = [p for p in new if p not in old], [p for p in old if p not in new]
        if not added and not gone and old and new:
            what.append("the same prompts in another order")
        else:
            what.append(f"prompts {saved['n_prompts']} -> {current['n_prompts']}"
                        + (f", new: {', '.join(repr(p) for p in added[:2])}" if added else "")
                        + (f", gone: {', '.join(repr(p) for p in gone[:2])}" if gone else ""))
    for key in ("seed", "per_step"):
        if saved.get(key) != current.get(key):
            what.append(f"{key} {saved.get(key)} -> {current.get(key)}")
    return (f"the checkpoint was trained with {describe(saved)}; this run has {describe(current)} "
            f"({'; '.join(what) or 'other settings'})")
