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
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from dopsd_core import schedules

from . import weights
from .concepts import World, make_world
from .dataset import concept_set
from .distill import DistillConfig, distill, make_couplings
from .dit import DiTConfig, ToyDiT
from .encoder import EncoderConfig, Tokenizer, ToyVLM
from .evaluator import Evaluator, EvaluatorConfig, train_evaluator
from .measure import original_prompts, read_samples, trigger_prompts
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
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def world(self) -> World:
        return make_world(self.world_seed, self.n_shapes, self.n_colours, self.n_styles)

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
    teacher: Optional[ToyModel]        # the multi-step pre-trained model (not in the shipped copy)
    evaluator: Evaluator
    meta: Dict
    directory: str


def _modules(cfg: BuildConfig, world: World):
    tok = Tokenizer(world.vocabulary(), cfg.encoder.max_len)
    enc_cfg = dataclasses.replace(cfg.encoder, vocab_size=len(tok))
    dit_cfg = dataclasses.replace(cfg.dit, context_dim=enc_cfg.width)
    return tok, ToyVLM(enc_cfg), ToyDiT(dit_cfg), ToyDiT(dit_cfg), \
        Evaluator(len(world.shapes), len(world.colours), len(world.styles))


def _evaluator_worker(cfg_dict, eval_dict, path):
    torch.set_num_threads(1)
    cfg = BuildConfig(**{**cfg_dict, "encoder": EncoderConfig(**cfg_dict["encoder"]),
                         "dit": DiTConfig(**cfg_dict["dit"]), "pretrain": PretrainConfig(**cfg_dict["pretrain"]),
                         "distill": DistillConfig(**cfg_dict["distill"]), "evaluator": EvaluatorConfig(**eval_dict)})
    net = train_evaluator(cfg.world(), cfg.evaluator, log=None)
    weights.save_module(net, path)


def base_measurements(b: "Build", n_orig: int = 512, n_trig: int = 256, log=print) -> Dict:
    """FD / attribute accuracy of teacher and student, and the in-context check on each held-out axis."""
    out = {}
    orig = original_prompts(b.world, b.evaluator, n_orig)
    runs = [("student_4", b.student, STUDENT_STEPS, 1.0)]
    if b.teacher is not None:
        runs = [("teacher_4", b.teacher, STUDENT_STEPS, 1.0), ("teacher_16_cfg", b.teacher, 16,
                                                               b.config.distill.teacher_cfg)] + runs
    for name, model, steps, cfg in runs:
        x = model.sample(orig.captions, orig.noise, student_sigmas(steps), cfg=cfg)
        out[name] = read_samples(b.world, b.evaluator, x, orig)
        if log:
            log(f"[measure] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[name].items()))
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


def build(cfg: BuildConfig = BuildConfig(), directory: Optional[str] = None,
          log: Optional[Callable[[str], None]] = print, measure: bool = True) -> Build:
    world = cfg.world()
    directory = directory or os.path.join(weights.cache_root(), cfg.key())
    t_start = time.time()
    timings = {}
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
    teacher = ToyModel(tok, enc_ema, dit_ema).eval()
    t = time.time()
    couplings = make_couplings(world, teacher, cfg.distill, log=log)
    timings["couplings_s"] = time.time() - t
    t = time.time()
    student_dit, _ = distill(teacher, couplings, cfg.distill, log=log)
    timings["distill_s"] = time.time() - t
    timings["build_s"] = time.time() - t_start

    os.makedirs(directory, exist_ok=True)
    weights.save_module(enc_ema, os.path.join(directory, "encoder.safetensors"))
    weights.save_module(dit_ema, os.path.join(directory, "dit_teacher.safetensors"))
    weights.save_module(student_dit, os.path.join(directory, "dit_student.safetensors"))
    shutil.copy(eval_path, os.path.join(directory, "evaluator.safetensors"))
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"config": cfg.to_dict(), "key": cfg.key(), "world": world.to_dict(), "timings": timings,
            "torch": torch.__version__, "threads": threads}
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
                          "evaluator": EvaluatorConfig(**d["evaluator"])})


def load_dir(directory: str) -> Build:
    meta = weights.read_meta(directory)
    cfg = config_from_dict(meta["config"])
    world = cfg.world()
    tok, enc, dit_s, dit_t, ev = _modules(cfg, world)
    weights.load_module(enc, os.path.join(directory, "encoder.safetensors"))
    weights.load_module(dit_s, os.path.join(directory, "dit_student.safetensors"))
    weights.load_module(ev, os.path.join(directory, "evaluator.safetensors"))
    teacher = None
    if os.path.exists(os.path.join(directory, "dit_teacher.safetensors")):
        weights.load_module(dit_t, os.path.join(directory, "dit_teacher.safetensors"))
        teacher = ToyModel(tok, enc, dit_t).eval()
    for m in (enc, dit_s, ev):
        m.eval().requires_grad_(False)
    if teacher is not None:
        dit_t.requires_grad_(False)
    return Build(cfg, world, tok, ToyModel(tok, enc, dit_s).eval(), teacher, ev.eval(), meta, directory)


def load(cfg: BuildConfig = BuildConfig(), build_if_missing: bool = True, log=print) -> Build:
    """The build for `cfg`: shipped copy, else cache, else built now (minutes) when allowed."""
    found = weights.find_build(cfg.key())
    if found:
        return load_dir(found)
    if not build_if_missing:
        raise FileNotFoundError(f"no toy-world build {cfg.key()} in {weights.SHIPPED_DIR} or {weights.cache_root()}; "
                                "run `python scripts/toyworld_build.py`")
    return build(cfg, log=log)
