"""Produce (or find) every weight of the toy world with one fixed seed: evaluator, pre-trained teacher,
4-step student. `load()` returns a ready `Build`; `scripts/toyworld_build.py` is the command line.

Order of work (wall times are logged and stored in meta.json):
1. the evaluator trains in a second process (one thread) while
2. the encoder + DiT pre-train (multi-step flow matching, text and text+image contexts),
3. the pre-trained EMA model samples (noise, image) couplings with a 16-step CFG sampler,
4. the 4-step student is distilled from them (reflow + distillation, see distill.py),
5. base measurements: teacher at 4 and 16 steps vs the student at 4 steps (FD, attribute accuracy), and the
   in-context check on held-out concepts (image in context vs trigger word alone).
"""
import copy
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

from dopsd_core import schedules

from . import weights
from .concepts import Variety, World, make_world
from .dataset import concept_set, labels, render_triples, sample_triples
from .distill import DistillConfig, distill, make_couplings
from .dit import DiTConfig, ToyDiT
from .encoder import EncoderConfig, Tokenizer, ToyVLM
from .evaluator import Evaluator, EvaluatorConfig, train_evaluator
from .measure import fd_floor, noise_for, original_prompts, read_samples, trigger_prompts
from .model import ToyModel
from .pretrain import PretrainConfig, pretrain

SHIFT = 3.0        # sampling shift of every schedule in the toy world (Z-Image-Turbo's)
STUDENT_STEPS = 4


def student_sigmas(steps: int = STUDENT_STEPS) -> torch.Tensor:
    """The inference schedule: ComfyUI `simple` over shift 3 -> 1.0, 0.9, 0.75, 0.5, 0 for 4 steps."""
    return schedules.simple_sigmas(steps, shift=SHIFT)


@dataclass
class BuildConfig:
    world_seed: int = 0
    n_shapes: int = 7
    n_colours: int = 10
    n_styles: int = 6
    variety: Variety = field(default_factory=Variety)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def world(self) -> World:
        return make_world(self.world_seed, self.n_shapes, self.n_colours, self.n_styles, variety=self.variety)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        return weights.config_hash(self.to_dict())


@dataclass
class Build:
    config: BuildConfig
    world: World
    tokenizer: Tokenizer
    student: ToyModel                  # the 4-step model every experiment fine-tunes
    teacher: Optional[ToyModel]        # the multi-step pre-trained model
    evaluator: Evaluator
    meta: Dict
    directory: str
    reflow: Optional[ToyModel] = None  # the reflow-distilled student, for comparison (cache only)


def _modules(cfg: BuildConfig, world: World):
    tok = Tokenizer(world.vocabulary(), cfg.encoder.max_len)
    enc_cfg = dataclasses.replace(cfg.encoder, vocab_size=len(tok))
    dit_cfg = dataclasses.replace(cfg.dit, context_dim=enc_cfg.width)
    return tok, ToyVLM(enc_cfg), ToyDiT(dit_cfg), ToyDiT(dit_cfg), \
        Evaluator(len(world.shapes), len(world.colours), len(world.styles))


def _evaluator_worker(cfg_dict, eval_dict, path):
    torch.set_num_threads(1)
    cfg = config_from_dict({**cfg_dict, "evaluator": eval_dict})
    net = train_evaluator(cfg.world(), cfg.evaluator, log=None)
    weights.save_module(net, path)


GAP_STEPS = (1, 2, 4, 8, 16, 32)   # Euler step counts of the distillation-gap table


def step_curve(b: "Build", model: ToyModel, prompts, steps: Sequence[int], noise_seeds: Sequence[int] = (0, 1, 2)):
    """FD and denoised sharpness of `model`'s samples of `prompts` at each Euler step count (shift 3), each the
    mean over `noise_seeds` (with the sd over them): the few-step quality of a model."""
    out = {}
    for k in steps:
        fds, sharp, acc = [], [], []
        for ns in noise_seeds:
            x = model.sample(prompts.captions, noise_for(prompts, ns), student_sigmas(k))
            r = read_samples(b.world, b.evaluator, x, prompts)
            fds.append(r["fd"])
            sharp.append(r["denoised_sharpness"])
            acc.append(r["acc_all"])
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731  sample sd over the noises
        out[str(k)] = {"fd": statistics.mean(fds), "fd_sd": sd(fds), "dsharp": statistics.mean(sharp),
                       "dsharp_sd": sd(sharp), "acc_all": statistics.mean(acc)}
    return out


def base_measurements(b: "Build", n_orig: int = 256, n_trig: int = 256, log=print) -> Dict:
    """The distillation gap (FD and denoised sharpness of the multi-step teacher, the 4-step student and, when
    built, the reflow student at 1-32 Euler steps, over 3 sampling noises, with the FD noise floor) and the
    in-context check on each held-out axis."""
    out = {}
    g = torch.Generator().manual_seed(77)
    every = sample_triples(b.world, 1024, g, seen_only=False)
    pred, truth = b.evaluator.predict(render_triples(b.world, every, g)), labels(b.world, every)
    out["evaluator_on_real"] = {a: float((pred[:, i] == truth[:, i]).float().mean()) for i, a in enumerate(World.AXES)}
    orig = original_prompts(b.world, b.evaluator, n_orig)
    out["fd_floor"] = fd_floor(b.world, b.evaluator, orig)
    models = [("student", b.student)] + [(n, m) for n, m in (("teacher", b.teacher), ("reflow", b.reflow)) if m is not None]
    for name, model in models:
        out[f"gap_{name}"] = step_curve(b, model, orig, GAP_STEPS if name == "teacher" else GAP_STEPS[:-1])
        if log:
            log(f"[measure] {name}: " + "; ".join(f"{k} steps FD {v['fd']:.0f} sharpness {v['dsharp']:.3f}"
                                                  for k, v in out[f"gap_{name}"].items()))
    for axis in World.AXES:
        cs = concept_set(b.world, axis, n=8, seed=3)
        trig = trigger_prompts(b.world, b.evaluator, axis, "sks", n=n_trig, triples=cs.triples)
        imgs = cs.images.repeat((n_trig + len(cs.images) - 1) // len(cs.images), 1, 1, 1)[:n_trig]
        text_only = b.student.sample(trig.captions, trig.noise, student_sigmas())
        with_image = b.student.sample(trig.captions, trig.noise, student_sigmas(), images=imgs)
        r_t = read_samples(b.world, b.evaluator, text_only, trig, axis)
        r_i = read_samples(b.world, b.evaluator, with_image, trig, axis)
        out[f"in_context_{axis}"] = {"text_only": r_t["concept_acc"], "with_image": r_i["concept_acc"],
                                     "with_image_fd": r_i["fd"], "text_only_fd": r_t["fd"]}
        if log:
            log(f"[measure] held-out {axis} {b.world.held_out[axis]!r}: concept accuracy trigger text only "
                f"{r_t['concept_acc']:.3f}, trigger text + image in context {r_i['concept_acc']:.3f}")
    return out


def gap_table(measurements: Dict) -> str:
    """Markdown: FD (with its noise floor) and denoised sharpness of the multi-step teacher, the DMD student and the
    reflow student at each Euler step count, from `base_measurements` (mean ± sd over the sampling noises)."""
    floor = sum(measurements["fd_floor"]) / len(measurements["fd_floor"])
    names = {"teacher": "multi-step teacher (pre-trained)", "student": "4-step student (DMD, shipped)",
             "reflow": "reflow student (version 1's method)"}
    rows = [(names[k[4:]], v) for k, v in measurements.items() if k.startswith("gap_")]
    rows.sort(key=lambda r: list(names.values()).index(r[0]))
    head = (f"FD of ordinary-prompt samples (noise floor {floor:.0f}) / denoised sharpness (real = 1), Euler at "
            "shift 3, mean ± sd over 3 sampling noises.\n\n| model | " + " | ".join(f"{k} steps" for k in GAP_STEPS)
            + " |\n|" + " --- |" * (1 + len(GAP_STEPS)) + "\n")
    body = []
    for name, curve in rows:
        cells = [f"{curve[str(k)]['fd']:.0f} ± {curve[str(k)]['fd_sd']:.0f} / {curve[str(k)]['dsharp']:.2f}"
                 if str(k) in curve else "-" for k in GAP_STEPS]
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"


def _stage_dir(cfg: BuildConfig) -> str:
    """Cache folder of the pre-training stage: everything but the distillation decides it."""
    d = cfg.to_dict()
    d.pop("distill")
    return os.path.join(weights.cache_root(), "pretrained", weights.config_hash(d))


def pretrained_stage(cfg: BuildConfig, world: World, log=print):
    """The pre-trained multi-step model (EMA encoder + DiT) and the evaluator, from the stage cache or trained now
    (the evaluator in a second process, one thread, while the models pre-train). Caching this stage lets a new
    distillation config reuse the longest part of the build."""
    directory = _stage_dir(cfg)
    tok, enc, dit, _, _ = _modules(cfg, world)
    if os.path.exists(os.path.join(directory, "meta.json")):
        weights.load_module(enc, os.path.join(directory, "encoder.safetensors"))
        weights.load_module(dit, os.path.join(directory, "dit_teacher.safetensors"))
        if log:
            log(f"[build] pre-trained stage from {directory}")
        return tok, enc.eval(), dit.eval(), weights.read_meta(directory)["timings"]
    t_start, timings = time.time(), {}
    torch.manual_seed(cfg.pretrain.seed)
    tok, enc, dit, _, _ = _modules(cfg, world)
    tmp = tempfile.mkdtemp(prefix="toyworld_build_")
    eval_path = os.path.join(tmp, "evaluator.safetensors")
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_evaluator_worker, args=(cfg.to_dict(), dataclasses.asdict(cfg.evaluator), eval_path))
    proc.start()
    if log:
        log(f"[build] world {world.fingerprint()} held out {world.held_out}; evaluator training in process {proc.pid}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        t = time.time()
        enc_ema, dit_ema, _ = pretrain(world, enc, dit, tok, cfg.pretrain, log=log)
        timings["pretrain_s"] = time.time() - t
    finally:
        proc.join()
        torch.set_num_threads(threads)
    if proc.exitcode != 0:
        raise RuntimeError(f"evaluator training failed (exit code {proc.exitcode})")
    timings["pretrain_and_evaluator_s"] = time.time() - t_start
    os.makedirs(directory, exist_ok=True)
    weights.save_module(enc_ema, os.path.join(directory, "encoder.safetensors"))
    weights.save_module(dit_ema, os.path.join(directory, "dit_teacher.safetensors"))
    shutil.copy(eval_path, os.path.join(directory, "evaluator.safetensors"))
    shutil.rmtree(tmp, ignore_errors=True)
    weights.write_meta(directory, {"config": cfg.to_dict(), "timings": timings})
    return tok, enc_ema.eval(), dit_ema.eval(), timings


def build(cfg: BuildConfig = BuildConfig(), directory: Optional[str] = None,
          log: Optional[Callable[[str], None]] = print, measure: bool = True) -> Build:
    world = cfg.world()
    directory = directory or os.path.join(weights.cache_root(), cfg.key())
    t_start = time.time()
    timings = {}
    tok, enc_ema, dit_ema, stage_timings = pretrained_stage(cfg, world, log)
    timings.update(stage_timings)
    teacher = ToyModel(tok, enc_ema, dit_ema).eval()
    t = time.time()
    couplings = make_couplings(world, teacher, cfg.distill, log=log)
    timings["couplings_s"] = time.time() - t
    t = time.time()
    student_dit, _ = distill(teacher, couplings, cfg.distill, log=log)
    timings["distill_s"] = time.time() - t
    reflow_dit = None
    if cfg.distill.method != "reflow":   # the simpler method on the same couplings, for the record
        t = time.time()
        reflow_dit, _ = distill(teacher, couplings, dataclasses.replace(cfg.distill, method="reflow"), log=log)
        timings["distill_reflow_s"] = time.time() - t
    timings["build_s"] = time.time() - t_start

    os.makedirs(directory, exist_ok=True)
    weights.save_module(enc_ema, os.path.join(directory, "encoder.safetensors"))
    weights.save_module(dit_ema, os.path.join(directory, "dit_teacher.safetensors"))
    weights.save_module(student_dit, os.path.join(directory, "dit_student.safetensors"))
    if reflow_dit is not None:
        weights.save_module(reflow_dit, os.path.join(directory, "dit_reflow.safetensors"))
    shutil.copy(os.path.join(_stage_dir(cfg), "evaluator.safetensors"), os.path.join(directory, "evaluator.safetensors"))
    meta = {"config": cfg.to_dict(), "key": cfg.key(), "world": world.to_dict(), "timings": timings,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    weights.write_meta(directory, meta)
    b = load_dir(directory)
    if measure:
        t = time.time()
        b.meta["measurements"] = base_measurements(b, log=log)
        b.meta["timings"]["measure_s"] = time.time() - t
        weights.write_meta(directory, b.meta)
    if log:
        log(f"[build] done in {timings['build_s']:.0f} s (+ measurements); weights in {directory}")
    return b


def config_from_dict(d: Dict) -> BuildConfig:
    return BuildConfig(**{**d, "encoder": EncoderConfig(**d["encoder"]), "dit": DiTConfig(**d["dit"]),
                          "pretrain": PretrainConfig(**d["pretrain"]), "distill": DistillConfig(**d["distill"]),
                          "evaluator": EvaluatorConfig(**d["evaluator"]),
                          "variety": Variety(**{**d["variety"], "radius": tuple(d["variety"]["radius"])})})


def load_dir(directory: str) -> Build:
    meta = weights.read_meta(directory)
    cfg = config_from_dict(meta["config"])
    world = cfg.world()
    tok, enc, dit_s, _, ev = _modules(cfg, world)
    weights.load_module(enc, os.path.join(directory, "encoder.safetensors"))
    weights.load_module(dit_s, os.path.join(directory, "dit_student.safetensors"))
    weights.load_module(ev, os.path.join(directory, "evaluator.safetensors"))
    for m in (enc, dit_s, ev):
        m.eval().requires_grad_(False)
    optional = {}
    for name in ("teacher", "reflow"):   # other DiTs on the same encoder, when the folder holds them
        path = os.path.join(directory, f"dit_{name}.safetensors")
        if os.path.exists(path):
            dit = weights.load_module(_modules(cfg, world)[2], path).eval().requires_grad_(False)
            optional[name] = ToyModel(tok, enc, dit).eval()
    return Build(cfg, world, tok, ToyModel(tok, enc, dit_s).eval(), optional.get("teacher"), ev.eval(), meta,
                 directory, optional.get("reflow"))


def load(cfg: BuildConfig = BuildConfig(), build_if_missing: bool = True, log=print) -> Build:
    """The build for `cfg`: shipped copy, else cache, else built now (minutes) when allowed."""
    found = weights.find_build(cfg.key())
    if found:
        return load_dir(found)
    if not build_if_missing:
        raise FileNotFoundError(f"no toy-world build {cfg.key()} in {weights.SHIPPED_DIR} or {weights.cache_root()}; "
                                "run `python scripts/toyworld_build.py`")
    return build(cfg, log=log)
