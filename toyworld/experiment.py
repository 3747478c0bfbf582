"""The experiment of issues #6 and #15: teach the 4-step student a held-out concept from a few images, five ways.

Methods (LoRA of equal rank on the same DiT Linear layers, equal optimizer steps and equal student
forward/backward passes per step: `passes_per_step` is recorded and printed):
- `sft`: vanilla flow-matching SFT on the target images (sigmas drawn as ComfyUI's trainer does, shift 3);
  each step draws K=4 noise levels per row, so it makes as many student passes as the distillation methods,
  which visit K=4 states per row (issue 15: it used to get 4x the rows as well, 384 vs 96 passes).
- `off_policy`: the EMA teacher (text + target image in context) supervises the student (text only) on noised
  *target images* at the 4 schedule sigmas.
- `dopsd_velocity`: D-OPSD (paper eq. 1): the student rolls out its own 4-step trajectory from noise; at every
  state the student's velocity matches the teacher's.
- `dopsd_x0`: the same, with the loss on x0 = x - sigma * v (the official code's choice).
- `dopsd_retention`: dopsd_velocity plus on-policy retention (dopsd_core/retention.py): a `retention_ratio` of
  the steps roll the student out on ordinary prompts (drawn like the evaluation's, plus the class prompts) with
  the frozen base model (LoRA off, text only) as the teacher.
All of them run through `dopsd_core.train.Trainer` (objectives, LoRA, EMA teacher, optimizer from the library).

Measured on fixed prompts and noises (see measure.py), over `noise_seeds` sampling noises: concept accuracy on
trigger prompts (training combinations and new ones), attribute accuracy on ordinary prompts (retention), the
bleed rate (ordinary prompts that name no colour drawn in the concept's colour), FD and the denoised sharpness
of ordinary-prompt samples at 1/2/4/8/16 Euler steps, FD on trigger prompts, and the training wall time.
Every FD comes with its noise floor (FD of fresh real renders of the same prompts).
"""
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dopsd_core import retention as core_retention
from dopsd_core.lora import LoRANetwork
from dopsd_core.train import TrainConfig, Trainer

from .build import Build, student_sigmas
from .dataset import concept_set, drop_words, sample_triples
from .measure import (PromptSet, bleed_rate, fd_floor, noise_for, original_prompts, read_samples,
                      trigger_prompts)

METHODS = ("sft", "off_policy", "dopsd_velocity", "dopsd_x0", "dopsd_retention")
K_STATES = 4


@dataclass
class ExperimentConfig:
    axis: str = "colour"              # which held-out attribute is the new concept
    trigger: str = "sks"
    n_images: int = 6
    n_combos: int = 2                 # distinct captions among the images (3 images per caption)
    n_prior: int = 6                  # prior-preservation pairs for every method (see prior_set); 0: none
    prior_seed: int = 50
    concept_seed: int = 0
    methods: Sequence[str] = METHODS
    rank: int = 4
    steps: int = 60
    lr: float = 1e-3
    repeats: int = 2                  # rows per step = (n_images + n_prior) * repeats, for every method
    ema_decay: float = 0.9999          # the official code's decay: the teacher stays (nearly) the base model
    targets: Sequence[str] = ("blocks.*",)
    retention_ratio: float = 1.0      # dopsd_retention: fraction of steps that add a retention batch
    n_retention_prompts: int = 64     # ordinary prompts drawn for retention (+ the class prompts)
    retention_seed: int = 60
    eval_every: int = 30
    n_curve_orig: int = 256
    n_curve_trig: int = 128
    n_final_orig: int = 256
    n_final_trig: int = 128
    noise_seeds: Sequence[int] = (0, 1, 2)        # sampling noises every final number is averaged over
    sample_steps: Sequence[int] = (1, 2, 4, 8, 16)  # Euler steps for FD / sharpness on ordinary prompts
    seed: int = 0                     # training seed (noise, LoRA init, retention draws)

    def to_dict(self):
        d = asdict(self)
        for k in ("methods", "targets", "noise_seeds", "sample_steps"):
            d[k] = list(getattr(self, k))
        return d


class ConceptTask:
    """dopsd_core TrainTask: one 'example' = the whole concept set, repeated; student text-only, teacher
    text + its own target image. With retention captions, run_retention is RetentionMix's host side."""

    def __init__(self, b: Build, net: LoRANetwork, images: torch.Tensor, captions: List[str], rows: int,
                 retention_captions: Sequence[str] = ()):
        reps = (rows + len(images) - 1) // len(images)
        self.x0 = images.repeat(reps, 1, 1, 1)[:rows]
        caps = (captions * reps)[:rows]
        model = b.student
        self.ctx_s, self.mask_s = model.encode(caps)
        self.ctx_t, self.mask_t = model.encode(caps, self.x0)
        self.dit, self.net = model.dit, net
        if retention_captions:
            self.ctx_r, self.mask_r = model.encode(list(retention_captions))

    def __len__(self):
        return 1

    def run(self, index, compute):
        dit = self.dit
        student, teacher = self.net.predictors(lambda x, sigma: dit(x, sigma, self.ctx_s, self.mask_s),
                                               lambda x, sigma: dit(x, sigma, self.ctx_t, self.mask_t))
        return compute(student, teacher, self.x0)

    def run_retention(self, index, prompt_ids, compute):
        """One retention step: the drawn ordinary prompts, student LoRA vs the LoRA-off base, same text."""
        dit, ids = self.dit, torch.tensor(prompt_ids)
        ctx, mask = self.ctx_r[ids], self.mask_r[ids]
        student, base = self.net.predictors(lambda x, sigma: dit(x, sigma, ctx, mask),
                                            lambda x, sigma: dit(x, sigma, ctx, mask), teacher_mode="off")
        return compute(student, base, torch.zeros(len(prompt_ids), *self.x0.shape[1:]))


def retention_captions(b: Build, cfg: ExperimentConfig, concept_captions: Sequence[str]) -> List[str]:
    """Ordinary prompts for retention, drawn as the evaluation's ordinary prompts are (shape always, colour and
    style each with probability 1/2, seen members only) with their own seed, plus the class prompts (the concept
    captions without the trigger: "a circle")."""
    g = torch.Generator().manual_seed(cfg.retention_seed)
    triples = sample_triples(b.world, cfg.n_retention_prompts, g, seen_only=True)
    keep = torch.rand(len(triples), 2, generator=g) < 0.5
    ordinary = [drop_words(t, (bool(k[0]), bool(k[1]), True)) for t, k in zip(triples, keep)]
    return core_retention.retention_prompts(ordinary, concept_captions, cfg.trigger)


def prior_set(b: Build, cfg: ExperimentConfig):
    """DreamBooth's prior preservation, the same data for every method: ordinary prompts ("a red circle") with the
    base model's own 4-step samples as their images. Without them nothing in the concept data says that the
    other colours must stay, and a LoRA this small learns "everything is the new colour" (measured: retention
    falls from 0.82 to 0.43 after 60 D-OPSD steps)."""
    g = torch.Generator().manual_seed(cfg.prior_seed)
    triples = sample_triples(b.world, cfg.n_prior, g, seen_only=True)
    caps = [drop_words(t, (True, False, True)) for t in triples]
    noise = torch.randn(cfg.n_prior, 3, 32, 32, generator=g)
    return b.student.sample(caps, noise, student_sigmas()), caps


def train_config(method: str, cfg: ExperimentConfig) -> TrainConfig:
    common = dict(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, grad_clip=1.0,
                  rollout_sigmas=tuple(float(s) for s in student_sigmas()[:-1]))
    if method == "sft":
        return TrainConfig(method="sft", sft_shift=3.0, sft_draws=K_STATES, **common)
    if method == "off_policy":
        return TrainConfig(method="off_policy", loss_space="velocity", **common)
    if method in ("dopsd_velocity", "dopsd_x0"):
        return TrainConfig(method="dopsd", loss_space=method.split("_")[1], **common)
    if method == "dopsd_retention":
        return TrainConfig(method="dopsd", loss_space="velocity", **common)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


@dataclass
class Evaluation:
    orig: PromptSet
    trig: PromptSet          # the training captions' combinations
    novel: PromptSet         # new combinations with the trigger word


def make_evaluation(b: Build, cfg: ExperimentConfig, triples, n_orig: int, n_trig: int) -> Evaluation:
    return Evaluation(original_prompts(b.world, b.evaluator, n_orig, seed=100),
                      trigger_prompts(b.world, b.evaluator, cfg.axis, cfg.trigger, n_trig, seed=200, triples=triples),
                      trigger_prompts(b.world, b.evaluator, cfg.axis, cfg.trigger, n_trig, seed=300))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _sample(b: Build, prompts: PromptSet, noise_seed: int, steps: int, net: Optional[LoRANetwork]):
    with (net.mode("student") if net is not None else _null()), torch.no_grad():
        return b.student.sample(prompts.captions, noise_for(prompts, noise_seed), student_sigmas(steps))


def measure(b: Build, ev: Evaluation, axis: str, member: str, net: Optional[LoRANetwork] = None,
            noise_seeds: Sequence[int] = (0,), sample_steps: Sequence[int] = (4,)) -> Dict[str, float]:
    """The read-outs of one model, each the mean over `noise_seeds` (and `<key>_sd_noise`, their spread).
    4-step samples: concept accuracy (trigger / new combinations), retention, bleed rate, FD (ordinary and
    trigger prompts), denoised sharpness and edge energy; FD and denoised sharpness also at every
    `sample_steps` count (`fd_orig@k`, `dsharp_orig@k`)."""
    per_seed: Dict[str, List[float]] = {}

    def add(key, value):
        per_seed.setdefault(key, []).append(float(value))

    samples = None
    for ns in noise_seeds:
        x_o = _sample(b, ev.orig, ns, 4, net)
        x_t = _sample(b, ev.trig, ns, 4, net)
        x_n = _sample(b, ev.novel, ns, 4, net)
        o = read_samples(b.world, b.evaluator, x_o, ev.orig)
        t = read_samples(b.world, b.evaluator, x_t, ev.trig, axis)
        n = read_samples(b.world, b.evaluator, x_n, ev.novel, axis)
        add("concept_acc", t["concept_acc"])
        add("concept_acc_novel", n["concept_acc"])
        add("retention", o["acc_all"])
        add("bleed", bleed_rate(b.world, o["_pred"], ev.orig, axis, member))
        add("fd_orig", o["fd"])
        add("dsharp_orig", o["denoised_sharpness"])
        add("sharpness_orig", o["sharpness"])
        add("fd_trig", t["fd"])
        add("trig_other_acc", t["other_acc"])
        for k in sample_steps:
            if k == 4:
                add("fd_orig@4", o["fd"])
                add("dsharp_orig@4", o["denoised_sharpness"])
                continue
            r = read_samples(b.world, b.evaluator, _sample(b, ev.orig, ns, k, net), ev.orig)
            add(f"fd_orig@{k}", r["fd"])
            add(f"dsharp_orig@{k}", r["denoised_sharpness"])
        if samples is None:
            samples = (x_o[:16], x_t[:16], x_n[:16])
    out = {k: sum(v) / len(v) for k, v in per_seed.items()}
    out.update({f"{k}_sd_noise": _sd(v) for k, v in per_seed.items() if k.startswith(("fd", "dsharp"))})
    out["_samples"] = samples
    return out


def _sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def floors(b: Build, ev: Evaluation) -> Dict[str, float]:
    """The FD noise floor of each prompt set (mean of 3 fresh real sets): what a perfect model scores."""
    return {name: sum(f) / len(f) for name, f in
            (("orig", fd_floor(b.world, b.evaluator, ev.orig)), ("trig", fd_floor(b.world, b.evaluator, ev.trig)),
             ("novel", fd_floor(b.world, b.evaluator, ev.novel)))}


def in_context_reference(b: Build, ev: Evaluation, images: torch.Tensor, axis: str) -> Dict[str, float]:
    """What the teacher condition produces before any training: student model, trigger text + target image."""
    n = len(ev.trig.captions)
    imgs = images.repeat((n + len(images) - 1) // len(images), 1, 1, 1)[:n]
    x = b.student.sample(ev.trig.captions, ev.trig.noise, student_sigmas(), images=imgs)
    r = read_samples(b.world, b.evaluator, x, ev.trig, axis)
    return {"concept_acc": r["concept_acc"], "fd_trig": r["fd"]}


def training_data(b: Build, cfg: ExperimentConfig, cs):
    """The (images, captions) every method trains on: the concept set, plus the prior pairs when asked for."""
    if not cfg.n_prior:
        return cs.images, list(cs.captions)
    prior_images, prior_caps = prior_set(b, cfg)
    return torch.cat([cs.images, prior_images]), list(cs.captions) + prior_caps


def passes_per_step(rows: int, retention_steps: int = 0, steps: int = 1) -> float:
    """Student forward/backward passes per optimizer step, averaged over the run: K per row for every method
    (SFT: K noise draws per row), plus K per retention row on the steps that add a retention batch."""
    return rows * K_STATES * (1.0 + retention_steps / steps)


def run_method(b: Build, method: str, cfg: ExperimentConfig, images: torch.Tensor, captions: List[str],
               curve: Evaluation, member: str, log: Optional[Callable[[str], None]] = print,
               concept_captions: Sequence[str] = ()) -> Dict:
    dit = b.student.dit
    net = LoRANetwork.for_module(dit, rank=cfg.rank, alpha=float(cfg.rank), targets=list(cfg.targets),
                                 ema_decay=cfg.ema_decay, seed=cfg.seed)
    handle = net.attach(dit)
    try:
        rows = len(images) * cfg.repeats
        ret_caps = retention_captions(b, cfg, concept_captions) if method == "dopsd_retention" else ()
        concept = ConceptTask(b, net, images, captions, rows, ret_caps)
        task = concept
        if method == "dopsd_retention":
            task = core_retention.RetentionMix(concept, len(ret_caps), cfg.retention_ratio, cfg.seed,
                                               concept.run_retention, per_step=rows, prompts=ret_caps)
        trainer = Trainer(net, task, train_config(method, cfg))
        curves, train_s = [], 0.0
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.steps:
                m = measure(b, curve, cfg.axis, member, net)
                m.pop("_samples")
                curves.append({"step": step, **m})
                if log:
                    log(f"[{method}] step {step}: concept {m['concept_acc']:.3f} (novel {m['concept_acc_novel']:.3f}) "
                        f"FD orig {m['fd_orig']:.0f} retention {m['retention']:.3f} bleed {m['bleed']:.3f} "
                        f"sharpness {m['dsharp_orig']:.3f} ({train_s:.0f} s training)")
            if step == cfg.steps:
                break
            t = time.perf_counter()
            trainer.train_step()
            train_s += time.perf_counter() - t
        out = {"net": net, "curves": curves, "train_s": train_s, "losses": list(trainer.losses),
               "passes_per_step": passes_per_step(rows)}
        if method == "dopsd_retention":
            out["retention_steps"] = sum(d is not None for d in task.log)
            out["retention_prompts"] = len(ret_caps)
            out["passes_per_step"] = passes_per_step(rows, out["retention_steps"], cfg.steps)
        return out
    finally:
        handle.remove()


def run_experiment(b: Build, cfg: ExperimentConfig, log: Optional[Callable[[str], None]] = print,
                   keep_nets: bool = False, base: Optional[Dict] = None) -> Dict:
    """One training seed: every method of cfg.methods, measured over cfg.noise_seeds. `base` (the untrained
    model's measurement, which no training seed changes) may be passed in to skip measuring it again."""
    torch.manual_seed(cfg.seed)
    cs = concept_set(b.world, cfg.axis, cfg.n_images, cfg.trigger, cfg.concept_seed, cfg.n_combos)
    if log:
        log(f"[experiment] concept: held-out {cfg.axis} {cs.member!r} as {cfg.trigger!r}; captions {sorted(set(cs.captions))}")
    curve = make_evaluation(b, cfg, cs.triples, cfg.n_curve_orig, cfg.n_curve_trig)
    final = make_evaluation(b, cfg, cs.triples, cfg.n_final_orig, cfg.n_final_trig)
    results = {"config": cfg.to_dict(), "concept": {"member": cs.member, "captions": cs.captions},
               "build": b.meta.get("key"), "floors": floors(b, final)}
    samples = {}
    if base is None:
        base = measure(b, final, cfg.axis, cs.member, None, cfg.noise_seeds, cfg.sample_steps)
        results["in_context"] = in_context_reference(b, final, cs.images, cfg.axis)
    base = dict(base)
    samples["base"] = base.pop("_samples", None)
    results["base"] = base
    if log:
        log(f"[experiment] base: {json.dumps({k: round(v, 3) for k, v in base.items()})}; FD floors "
            f"{json.dumps({k: round(v, 1) for k, v in results['floors'].items()})}")
    results["methods"] = {}
    nets = {}
    images, captions = training_data(b, cfg, cs)  # sampled once, from the base model (no LoRA attached)
    for method in cfg.methods:
        r = run_method(b, method, cfg, images, captions, curve, cs.member, log, cs.captions)
        handle = r["net"].attach(b.student.dit)
        try:
            fin = measure(b, final, cfg.axis, cs.member, r["net"], cfg.noise_seeds, cfg.sample_steps)
        finally:
            handle.remove()
        samples[method] = fin.pop("_samples")
        results["methods"][method] = {"final": fin, "curves": r["curves"], "train_s": r["train_s"],
                                      "passes_per_step": r["passes_per_step"],
                                      "loss_first": r["losses"][:5], "loss_last": r["losses"][-5:],
                                      **{k: r[k] for k in ("retention_steps", "retention_prompts") if k in r}}
        if keep_nets:
            nets[method] = r["net"]
        if log:
            log(f"[experiment] {method} final: {json.dumps({k: round(v, 3) for k, v in fin.items()})}, "
                f"train {r['train_s']:.1f} s")
    results["_samples"] = samples
    results["_target_images"] = cs.images
    if keep_nets:
        results["_nets"] = nets
    return results


NAMES = {"base": "base 4-step student (no LoRA)", "sft": "vanilla SFT", "off_policy": "off-policy distillation",
         "dopsd_velocity": "D-OPSD (velocity loss)", "dopsd_x0": "D-OPSD (x0 loss)",
         "dopsd_retention": "D-OPSD (velocity) + on-policy retention"}


def aggregate(runs: Sequence[Dict]) -> Dict:
    """Mean and spread (sample sd over training seeds) of every final number, per method; base as measured."""
    out = {"seeds": [r["config"]["seed"] for r in runs], "floors": runs[0]["floors"], "base": runs[0]["base"],
           "config": runs[0]["config"], "methods": {}}
    for m in runs[0]["methods"]:
        finals = [r["methods"][m]["final"] for r in runs]
        out["methods"][m] = {
            "mean": {k: sum(f[k] for f in finals) / len(finals) for k in finals[0]},
            "sd": {k: _sd([f[k] for f in finals]) for k in finals[0]},
            "train_s": sum(r["methods"][m]["train_s"] for r in runs) / len(runs),
            "passes_per_step": sum(r["methods"][m]["passes_per_step"] for r in runs) / len(runs)}
    return out


def _pm(mean, sd, digits):
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(agg: Dict) -> str:
    """Markdown: the 4-step table (mean ± sd over training seeds, each the mean over noise seeds) and the
    FD / denoised sharpness vs Euler steps table. Every FD column carries its noise floor."""
    fl, cfg = agg["floors"], agg["config"]
    n_seeds, n_noise = len(agg["seeds"]), len(cfg["noise_seeds"])
    head = (f"Training seeds {agg['seeds']} (± = sd over them), each the mean over {n_noise} sampling noises; "
            f"{cfg['steps']} steps, lr {cfg['lr']:g}, rank {cfg['rank']}. FD noise floors (fresh real renders): "
            f"ordinary prompts {fl['orig']:.0f}, trigger prompts {fl['trig']:.0f}.\n\n"
            "| model | concept acc. (trigger prompts) | concept acc. (new combos) | retention (attribute acc., "
            "ordinary prompts) | bleed rate | FD 4-step, ordinary prompts (floor " + f"{fl['orig']:.0f}" + ") | "
            "denoised sharpness / real, 4-step | FD 4-step, trigger prompts (floor " + f"{fl['trig']:.0f}" + ") | "
            "student passes / step | train wall time |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    b = agg["base"]
    rows = [f"| {NAMES['base']} | {b['concept_acc']:.3f} | {b['concept_acc_novel']:.3f} | {b['retention']:.3f} | "
            f"{b['bleed']:.3f} | {b['fd_orig']:.0f} (noise sd {b['fd_orig_sd_noise']:.0f}) | {b['dsharp_orig']:.3f} | "
            f"{b['fd_trig']:.0f} | - | - |"]
    for m, r in agg["methods"].items():
        mu, sd = r["mean"], r["sd"]
        rows.append(f"| {NAMES.get(m, m)} | {_pm(mu['concept_acc'], sd['concept_acc'], 3)} | "
                    f"{_pm(mu['concept_acc_novel'], sd['concept_acc_novel'], 3)} | "
                    f"{_pm(mu['retention'], sd['retention'], 3)} | {_pm(mu['bleed'], sd['bleed'], 3)} | "
                    f"{_pm(mu['fd_orig'], sd['fd_orig'], 0)} | {_pm(mu['dsharp_orig'], sd['dsharp_orig'], 3)} | "
                    f"{_pm(mu['fd_trig'], sd['fd_trig'], 0)} | {r['passes_per_step']:.0f} | {r['train_s']:.0f} s |")
    steps = cfg["sample_steps"]
    head2 = ("\nOrdinary prompts at 1 / 2 / 4 / 8 / 16 Euler steps (shift 3): FD (floor " f"{fl['orig']:.0f}" ") and "
             "denoised sharpness / real.\n\n| model | " + " | ".join(f"FD {k} steps" for k in steps) + " | "
             + " | ".join(f"sharpness {k} steps" for k in steps) + " |\n|" + " --- |" * (1 + 2 * len(steps)) + "\n")
    rows2 = ["| " + NAMES["base"] + " | " + " | ".join(f"{b[f'fd_orig@{k}']:.0f}" for k in steps) + " | "
             + " | ".join(f"{b[f'dsharp_orig@{k}']:.3f}" for k in steps) + " |"]
    for m, r in agg["methods"].items():
        mu, sd = r["mean"], r["sd"]
        rows2.append(f"| {NAMES.get(m, m)} | " + " | ".join(_pm(mu[f'fd_orig@{k}'], sd[f'fd_orig@{k}'], 0) for k in steps)
                     + " | " + " | ".join(_pm(mu[f'dsharp_orig@{k}'], sd[f'dsharp_orig@{k}'], 3) for k in steps) + " |")
    return head + "\n".join(rows) + "\n" + head2 + "\n".join(rows2) + "\n"


def reduced_config(seed: int = 0) -> ExperimentConfig:
    """The CI test's version: SFT, D-OPSD (velocity) with and without retention; 40 steps of 12 rows, one sampling
    noise, 4-step measurements only, smaller prompt sets."""
    return ExperimentConfig(methods=("sft", "dopsd_velocity", "dopsd_retention"), steps=40, repeats=1,
                            eval_every=1000, n_curve_orig=64, n_curve_trig=32, n_final_orig=256, n_final_trig=128,
                            noise_seeds=(0,), sample_steps=(4,), seed=seed)
