"""The experiment of issue #6: teach the 4-step student a held-out concept from a few images, four ways.

Methods (LoRA of equal rank on the same DiT Linear layers, equal optimizer steps and equal student
forward/backward passes per step):
- `sft`: vanilla flow-matching SFT on the target images (sigmas drawn as ComfyUI's trainer does, shift 3);
  each step sees every row K=4 times with independent noise levels, so it makes as many student passes as
  the distillation methods, which visit K=4 states per row.
- `off_policy`: the EMA teacher (text + target image in context) supervises the student (text only) on noised
  *target images* at the 4 schedule sigmas.
- `dopsd_velocity`: D-OPSD (paper eq. 1): the student rolls out its own 4-step trajectory from noise; at every
  state the student's velocity matches the teacher's.
- `dopsd_x0`: the same, with the loss on x0 = x - sigma * v (the official code's choice).
All four run through `dopsd_core.train.Trainer` (objectives, LoRA, EMA teacher, optimizer from the library).

Measured on fixed prompts and noises (see measure.py): concept accuracy on trigger prompts, FD of 4-step
samples on original prompts (few-step quality), attribute accuracy on original prompts (retention), FD on
the trigger prompts, and the training wall time (measurement excluded).
"""
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dopsd_core.lora import LoRANetwork
from dopsd_core.train import TrainConfig, Trainer

from .build import Build, student_sigmas
from .dataset import concept_set, drop_words, sample_triples
from .measure import PromptSet, original_prompts, read_samples, trigger_prompts

METHODS = ("sft", "off_policy", "dopsd_velocity", "dopsd_x0")
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
    steps: int = 200
    lr: float = 1e-3
    repeats: int = 2                  # rows per step = n_images * repeats (x K for sft)
    ema_decay: float = 0.9999          # the official code's decay: the teacher stays (nearly) the base model
    targets: Sequence[str] = ("blocks.*",)
    eval_every: int = 25
    n_curve_orig: int = 256
    n_curve_trig: int = 128
    n_final_orig: int = 512
    n_final_trig: int = 256
    seed: int = 0                     # training seed (noise, LoRA init)

    def to_dict(self):
        d = asdict(self)
        d["methods"], d["targets"] = list(self.methods), list(self.targets)
        return d


class ConceptTask:
    """dopsd_core TrainTask: one 'example' = the whole concept set, repeated; student text-only, teacher
    text + its own target image."""

    def __init__(self, b: Build, net: LoRANetwork, images: torch.Tensor, captions: List[str], rows: int):
        reps = (rows + len(images) - 1) // len(images)
        self.x0 = images.repeat(reps, 1, 1, 1)[:rows]
        caps = (captions * reps)[:rows]
        model = b.student
        self.ctx_s, self.mask_s = model.encode(caps)
        self.ctx_t, self.mask_t = model.encode(caps, self.x0)
        self.dit, self.net = model.dit, net

    def __len__(self):
        return 1

    def run(self, index, compute):
        dit = self.dit
        student, teacher = self.net.predictors(lambda x, sigma: dit(x, sigma, self.ctx_s, self.mask_s),
                                               lambda x, sigma: dit(x, sigma, self.ctx_t, self.mask_t))
        return compute(student, teacher, self.x0)


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
        return TrainConfig(method="sft", sft_shift=3.0, **common)
    if method == "off_policy":
        return TrainConfig(method="off_policy", loss_space="velocity", **common)
    if method in ("dopsd_velocity", "dopsd_x0"):
        return TrainConfig(method="dopsd", loss_space=method.split("_")[1], **common)
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


def measure(b: Build, ev: Evaluation, axis: str, net: Optional[LoRANetwork] = None) -> Dict[str, float]:
    sig = student_sigmas()
    mode = net.mode("student") if net is not None else _null()
    with mode, torch.no_grad():
        x_o = b.student.sample(ev.orig.captions, ev.orig.noise, sig)
        x_t = b.student.sample(ev.trig.captions, ev.trig.noise, sig)
        x_n = b.student.sample(ev.novel.captions, ev.novel.noise, sig)
    o = read_samples(b.world, b.evaluator, x_o, ev.orig)
    t = read_samples(b.world, b.evaluator, x_t, ev.trig, axis)
    n = read_samples(b.world, b.evaluator, x_n, ev.novel, axis)
    return {"concept_acc": t["concept_acc"], "concept_acc_novel": n["concept_acc"],
            "fd_orig": o["fd"], "sharpness_orig": o["sharpness"], "retention": o["acc_all"], "fd_trig": t["fd"], "trig_other_acc": t["other_acc"],
            "_samples": (x_o[:16], x_t[:16], x_n[:16])}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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


def run_method(b: Build, method: str, cfg: ExperimentConfig, images: torch.Tensor, captions: List[str],
               curve: Evaluation, log: Optional[Callable[[str], None]] = print) -> Dict:
    dit = b.student.dit
    net = LoRANetwork.for_module(dit, rank=cfg.rank, alpha=float(cfg.rank), targets=list(cfg.targets),
                                 ema_decay=cfg.ema_decay, seed=cfg.seed)
    handle = net.attach(dit)
    try:
        rows = len(images) * cfg.repeats * (K_STATES if method == "sft" else 1)
        task = ConceptTask(b, net, images, captions, rows)
        trainer = Trainer(net, task, train_config(method, cfg))
        curves, train_s = [], 0.0
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.steps:
                m = measure(b, curve, cfg.axis, net)
                m.pop("_samples")
                curves.append({"step": step, **m})
                if log:
                    log(f"[{method}] step {step}: concept {m['concept_acc']:.3f} (novel {m['concept_acc_novel']:.3f}) "
                        f"FD orig {m['fd_orig']:.3f} retention {m['retention']:.3f} FD trig {m['fd_trig']:.3f} "
                        f"({train_s:.0f} s training)")
            if step == cfg.steps:
                break
            t = time.perf_counter()
            trainer.train_step()
            train_s += time.perf_counter() - t
        return {"net": net, "curves": curves, "train_s": train_s, "losses": list(trainer.losses)}
    finally:
        handle.remove()


def run_experiment(b: Build, cfg: ExperimentConfig, log: Optional[Callable[[str], None]] = print,
                   keep_nets: bool = False) -> Dict:
    torch.manual_seed(cfg.seed)
    cs = concept_set(b.world, cfg.axis, cfg.n_images, cfg.trigger, cfg.concept_seed, cfg.n_combos)
    if log:
        log(f"[experiment] concept: held-out {cfg.axis} {cs.member!r} as {cfg.trigger!r}; captions {sorted(set(cs.captions))}")
    curve = make_evaluation(b, cfg, cs.triples, cfg.n_curve_orig, cfg.n_curve_trig)
    final = make_evaluation(b, cfg, cs.triples, cfg.n_final_orig, cfg.n_final_trig)
    results = {"config": cfg.to_dict(), "concept": {"member": cs.member, "captions": cs.captions},
               "build": b.meta.get("key")}
    base = measure(b, final, cfg.axis)
    samples = {"base": base.pop("_samples")}
    results["base"] = base
    results["in_context"] = in_context_reference(b, final, cs.images, cfg.axis)
    if log:
        log(f"[experiment] base: {json.dumps({k: round(v, 3) for k, v in base.items()})}; teacher condition "
            f"(trigger + image in context): {json.dumps({k: round(v, 3) for k, v in results['in_context'].items()})}")
    results["methods"] = {}
    nets = {}
    images, captions = training_data(b, cfg, cs)  # sampled once, from the base model (no LoRA attached)
    for method in cfg.methods:
        r = run_method(b, method, cfg, images, captions, curve, log)
        handle = r["net"].attach(b.student.dit)
        try:
            fin = measure(b, final, cfg.axis, r["net"])
        finally:
            handle.remove()
        samples[method] = fin.pop("_samples")
        results["methods"][method] = {"final": fin, "curves": r["curves"], "train_s": r["train_s"],
                                      "loss_first": r["losses"][:5], "loss_last": r["losses"][-5:]}
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


NAMES = {"sft": "vanilla SFT", "off_policy": "off-policy distillation", "dopsd_velocity": "D-OPSD (velocity loss)",
         "dopsd_x0": "D-OPSD (x0 loss)"}
TABLE_HEAD = ("| model | lr | concept acc. (trigger prompts) | concept acc. (new combos) | retention (attribute acc., "
              "original prompts) | FD 4-step, original prompts | edge energy / real, 4-step, original prompts | "
              "FD 4-step, trigger prompts | train wall time |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def _row(name, lr, f, wall):
    return (f"| {name} | {lr} | {f['concept_acc']:.3f} | {f['concept_acc_novel']:.3f} | {f['retention']:.3f} | "
            f"{f['fd_orig']:.0f} | {f['sharpness_orig']:.3f} | {f['fd_trig']:.0f} | {wall} |")


def table_rows(results: Dict, with_base: bool = True) -> List[str]:
    rows = [_row("base 4-step student (no LoRA)", "-", results["base"], "-")] if with_base else []
    lr = f"{results['config']['lr']:g}"
    for m, r in results["methods"].items():
        rows.append(_row(NAMES.get(m, m), lr, r["final"], f"{r['train_s']:.0f} s"))
    return rows


def table(results: Dict) -> str:
    """Markdown table: base model and each method."""
    return TABLE_HEAD + "\n".join(table_rows(results)) + "\n"


def reduced_config(seed: int = 0) -> ExperimentConfig:
    """The CI test's version: SFT and D-OPSD (velocity) only, fewer steps and smaller measurement sets."""
    return ExperimentConfig(methods=("sft", "dopsd_velocity"), steps=60, eval_every=30, n_curve_orig=128,
                            n_curve_trig=64, n_final_orig=256, n_final_trig=128, seed=seed)
