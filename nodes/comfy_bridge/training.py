"""A job's whole training inside ComfyUI, top to bottom: one training step and the loop around it.

    Training.run()                           set up, loop, final save / preview (or a stop of its own)
      while step < steps:                    Training.loop()
        wait while paused; stop?             the job's own Pause / Stop (ComfyUI's Cancel never reaches here)
        with the model turn:                 turns.TURN: never while a prompt runs (it may unload the model)
          for each of grad_accum micro-steps:
            pairs = choose_examples(...)     which example(s) (and caption variant) this micro-step trains on
            ComfyTask.run_pairs:             one batch of one bucket (batches.py)
              load with working memory       memory.load_for_training (re-attaches the LoRA after an unload)
              run the guider                 guided.run_guided: CFGGuider.sample -> calc_cond_batch velocities,
                                             inside the block guard / checkpointing (blocks.py)
              call the objective             Trainer.objective -> dopsd_core.objectives (backward inside)
            maybe a retention prompt         retention_nodes: the same step on an ordinary prompt, base teacher
          step optimizer and EMA             Trainer.update: clip, NaN guard, AdamW, lr schedule, EMA teacher
        report                               the job's status and dopsd.progress event (nodes/jobs.py)
        every save_every steps: save         training_state.pt + loras/<save_prefix>_stepNNNNN.safetensors
        every preview_every steps: preview   student / teacher samples from the same noise, decoded by the VAE

dopsd_core.train.Trainer keeps the method's arithmetic (noise, objective, accumulation, update, EMA, exact-resume
state); this module decides when and where it runs in ComfyUI. nodes/jobs.py owns the thread, the job's state,
its status and events; it calls `Training.run()` on its thread and nothing else of the loop.
"""
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import folder_paths
import numpy as np
import torch
from PIL import Image

from ...dopsd_core import checkpoint as ckpt
from ...dopsd_core import sampler
from ...dopsd_core.train import StepClock, Trainer, TrainResult
from ..pairs import Pair, detached_copy
from ..teacher_nodes import decode_images
from .. import retention_nodes
from . import batches, blocks, guided, lora_patch, memory, turns

MAX_STEP_ATTEMPTS = 3     # tries of one micro-step whose model was unloaded midway, before the job gives up
BLIND_TEACHER_STEPS = 3


class ModelLost(RuntimeError):
    """The job's model was unloaded and could not be used again; the job stops with its LoRA saved."""


@dataclass
class Options:
    """The trainer node's settings that are not dopsd_core.TrainConfig's."""
    gradient_checkpointing: bool = False
    preview_every: int = 0                           # 0: no previews
    save_prefix: str = ""                            # '' : the LoRA stays in memory (Save LoRA node)
    resume_from: str = ""                            # a training_state.pt of a job with the same settings
    inference_sigmas: Optional[torch.Tensor] = None  # the sampler's schedule, for previews
    job_dir: str = ""                                # output/dopsd_jobs/<job id>: training_state.pt
    retention: Optional[dict] = None                 # retention_nodes.for_job's spec; None: the paper's method


# -- which example(s) a micro-step trains on ----------------------------------------------------------
check_batchable = batches.check_batchable   # the trainer node's check before a job with batch_size > 1 starts


def choose_examples(trainer: Trainer, pairs: List[Pair], examples=None) -> List[Pair]:
    """The pairs of the next micro-step: a batch of one bucket (batches.bucket_key) from the trainer's seeded,
    resumable order, every pair once per epoch. The one place that decides what a micro-step trains on.

    `examples` (recipe_bridge.ExampleSetup, from the trainer node) picks each pair's caption variant for this
    epoch (multi-caption rows, caption dropout; seeded by the job seed, so a resumed job draws the same) and,
    for the official klein recipe, sets the rollout states for the pair's resolution."""
    indices = trainer.next_batch()
    if examples is None:
        return [pairs[i] for i in indices]
    chosen = []
    for i in indices:
        conds = examples.begin(i)
        chosen.append(dataclasses.replace(pairs[i], student=conds["positive"], teacher=conds["teacher"]))
    return chosen


def check_variants_batchable(pairs: List[Pair], batch_size: int):
    """Before a job starts: with batch_size > 1 every caption variant of a pair must stack like the pair itself
    (the same conditioning layout), since a micro-step may draw any of them. ValueError naming the fix."""
    if batch_size <= 1:
        return
    for p in pairs:
        for caption, student, teacher, _ in p.variants:
            if batches.bucket_key(dataclasses.replace(p, student=student, teacher=teacher)) != batches.bucket_key(p):
                raise ValueError(f"batch_size {batch_size}: the caption {caption!r} of an image tokenizes to another "
                                 f"length than its first caption {p.caption!r}, so the captions drawn per epoch could "
                                 "not share a batch. Use batch_size 1 with grad_accum "
                                 f"{batch_size} for the same effective batch, or caption_sampling 'first caption'")


# -- one micro-step: load, guider, objective ------------------------------------------------------------
@contextlib.contextmanager
def guarded_blocks(model, net, checkpointing: bool):
    """Training flags plus the block guard (activation copies for in-place blocks) or gradient checkpointing."""
    with guided.training_flags():
        handle = blocks.guard_blocks(model, net, checkpointing)
        try:
            yield
        finally:
            handle.remove()


class ComfyTask:
    """dopsd_core TrainTask over ComfyUI pairs: each micro-step's batch runs inside guider.sample.

    Before each micro-step the job's patcher is loaded with the working memory training needs (memory.py),
    which also re-attaches the LoRA after ComfyUI unloaded the model. A micro-step during which ComfyUI ejected
    the LoRA (the model was unloaded midway) is discarded, gradients restored, and run again; after
    MAX_STEP_ATTEMPTS such tries, or when the model cannot be loaded, ModelLost. Also the task of the torchrun
    launcher and the benchmarks (no attachment: no unload detection).
    """

    def __init__(self, model, net, pairs: List[Pair], seed: int, attachment=None, checkpointing: bool = False,
                 precision: str = "fp32"):
        self.model, self.net, self.pairs, self.seed = model, net, pairs, seed
        self.attachment = attachment
        self.checkpointing, self.precision = checkpointing, precision
        self.memory_required: Dict[tuple, int] = {}

    def __len__(self):
        return len(self.pairs)

    def bucket(self, index: int) -> tuple:
        return batches.bucket_key(self.pairs[index])

    def run(self, index, compute):
        return self.run_pairs([self.pairs[index]], compute)

    def run_batch(self, indices, compute):
        return self.run_pairs([self.pairs[i] for i in indices], compute)

    def working_memory(self, pair: Pair) -> int:
        cond_tokens = max(pair.student[0][0].shape[1], pair.teacher[0][0].shape[1])
        key = (tuple(pair.latent.shape), cond_tokens)
        if key not in self.memory_required:
            self.memory_required[key] = memory.training_memory(self.model, self.net, pair.latent.shape, cond_tokens,
                                                               self.checkpointing, self.precision)
        return self.memory_required[key]

    def _load(self, pair: Pair):
        try:
            memory.load_for_training(self.model, self.working_memory(pair))
        except Exception as e:
            raise ModelLost(f"ComfyUI could not load the model for training ({type(e).__name__}: {e})") from e

    def run_pairs(self, pairs: List[Pair], compute):
        """compute(student, teacher, x0) on `pairs` stacked into one batch; returns its StepResult."""
        pair = batches.stack_pairs(pairs)
        params = self.net.trainable_parameters()
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            self._load(pair)
            outcome = {"lost": False}
            try:
                with guarded_blocks(self.model, self.net, self.checkpointing):
                    result = self._run_once(pair, compute, outcome)
            except Exception:
                if not outcome["lost"]:
                    raise
                result = None
            if not outcome["lost"]:
                return result
            for p, g in zip(params, grads):
                p.grad = g
            logging.warning("D-OPSD: the model was unloaded during a training step (try %d of %d); running the "
                            "step again with the LoRA re-attached", attempt, MAX_STEP_ATTEMPTS)
        raise ModelLost(f"the model was unloaded during {MAX_STEP_ATTEMPTS} tries of one training step")

    def _run_once(self, pair: Pair, compute, outcome: dict):
        net, attachment = self.net, self.attachment

        def body(model_wrap, model_options, latent, noise):
            # guider.sample has loaded the model (re-injecting the LoRA); from here on it must stay attached
            outcome["ejections"] = attachment.ejections if attachment is not None else 0
            if attachment is not None and not attachment.injected:
                outcome["lost"] = True
                return None
            student, teacher = net.predictors(guided.velocity_fn(model_wrap, model_options, "positive"),
                                              guided.velocity_fn(model_wrap, model_options, "teacher"),
                                              getattr(pair, "teacher_mode", "teacher"))  # "off": retention
            try:
                return compute(student, teacher, latent)
            finally:  # (guider.sample itself ejects and re-injects around sampling, which is harmless)
                outcome["lost"] = attachment is not None and attachment.ejections != outcome["ejections"]

        return guided.run_guided(self.model, {"positive": pair.student, "teacher": pair.teacher}, pair.latent,
                                 body, seed=self.seed)


# -- previews -------------------------------------------------------------------------------------------
def sample_pair(model, net, pair: Pair, sigmas: torch.Tensor, seed: int):
    """Few-step Euler samples of `pair` with the student and the teacher context, from the same noise.

    Returns {"student": latent, "teacher": latent} in VAE space. With a LoRANetwork, the student uses the
    student LoRA and the teacher the EMA LoRA; without one, the bare model (teacher preview before training).
    """
    out = {}

    def body(model_wrap, model_options, latent, noise):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(latent.shape, generator=gen).to(latent.device, latent.dtype)
        for role, key in (("student", "positive"), ("teacher", "teacher")):
            v = guided.velocity_fn(model_wrap, model_options, key)

            def fn(x, s, _v=v, _role=role):
                ctx = net.mode(_role) if net is not None else contextlib.nullcontext()
                with ctx:
                    return _v(x, s)

            out[role] = model_wrap.inner_model.process_latent_out(sampler.sample_euler(fn, start, sigmas))
        return None

    with torch.no_grad():
        guided.run_guided(model, {"positive": pair.student, "teacher": pair.teacher}, pair.latent, body, seed=seed)
    return out


def image_ref(images: torch.Tensor, job_id: str, name: str) -> dict:
    """Save the first image of [B,H,W,3] into ComfyUI's temp dir; returns an events.ImageRef."""
    sub = os.path.join("dopsd", job_id)
    folder = os.path.join(folder_paths.get_temp_directory(), sub)
    os.makedirs(folder, exist_ok=True)
    array = (images[0].detach().clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    filename = f"{name}.png"
    Image.fromarray(array).save(os.path.join(folder, filename))
    return {"filename": filename, "subfolder": sub, "type": "temp"}


def refuse_blind_teacher(method: str, losses: List[List[float]]):
    """Stop a job whose teacher and student agree exactly (loss 0.0) for its first BLIND_TEACHER_STEPS
    steps: the teacher sees nothing the student does not (e.g. a context the model ignores), so the LoRA
    would stay zero. Raising here ends the job in state "error" with this message."""
    if method == "sft" or len(losses) != BLIND_TEACHER_STEPS or losses[0][0] != 1:
        return
    if all(loss == 0.0 for _, loss in losses):
        raise RuntimeError(f"the teacher's and the student's predictions were identical for the first "
                           f"{BLIND_TEACHER_STEPS} steps (loss exactly 0), so the LoRA would stay all zero: the model "
                           "ignores the teacher's extra context. Use a teacher this model can see (Z-Image: the VLM "
                           "Splice teacher; FLUX.2-klein: Reference Latent)")


# -- the loop -------------------------------------------------------------------------------------------
class Training:
    """One job's training: the model clone, its LoRA (job.net), the pairs and the core Trainer.

    `job` (nodes/jobs.Job) supplies cfg, net, control, use_turns, test_hook and save_lora(), and receives the
    reports: step_done(progress), checkpoint_saved(path, step, is_lora), preview_ready(step, refs), warn(message).
    """

    def __init__(self, job, model, pairs: List[Pair], vae, options: Options):
        self.job, self.model, self.pairs_in, self.vae, self.options = job, model, pairs, vae, options
        self.net, self.cfg, self.control = job.net, job.cfg, job.control
        self.pairs: Optional[List[Pair]] = None
        self.attachment = self.task = None
        self.trainer: Optional[Trainer] = None
        self.examples = None   # recipe_bridge.ExampleSetup (the trainer node sets it): caption variants, states
        self.retention = None  # dopsd_core.retention.RetentionMix over the task, when the job has retention
        self.result: Optional[TrainResult] = None   # step, all losses (a resumed run's too), stopped

    def setup(self):
        self.pairs = detached_copy(self.pairs_in)   # autograd refuses the executor's inference tensors
        self.attachment = lora_patch.install(self.model, self.net)
        self.task = ComfyTask(self.model, self.net, self.pairs, self.cfg.seed, self.attachment,
                              self.options.gradient_checkpointing, self.cfg.precision)
        self.trainer = Trainer(self.net, self.task, self.cfg, control=self.control)
        self.retention = retention_nodes.with_retention(self.task, self.options.retention, self.cfg.seed)
        retention_nodes.record(self.retention, self.trainer)
        if self.examples is not None:
            self.examples.pairs, self.examples.trainer = self.pairs, self.trainer
        if self.options.resume_from:
            try:
                ckpt.load_checkpoint(self.options.resume_from, self.trainer)
            except Exception as e:
                raise ValueError(f"cannot resume from {self.options.resume_from}: it is not a training_state.pt of "
                                 f"a job with the same settings ({type(e).__name__}: {e})") from e
            self.job.step = self.trainer.step   # the status starts where the resumed run left off
            retention_warning = retention_nodes.after_resume(self.retention, self.trainer)
            for warning in self.trainer.resume_warnings + ([retention_warning] if retention_warning else []):
                self.job.warn(warning)  # the job trains on; the user sees why it is no exact continuation

    def run(self) -> Tuple[str, Optional[str]]:
        """Train to the end or a stop; returns the final state ("finished" | "stopped") and, when the job
        stopped by itself, the reason. Errors propagate (the job reports them)."""
        self.setup()
        try:
            stopped = self.loop()
        except ModelLost as e:
            self.result = TrainResult(self.trainer.step, list(self.trainer.losses), stopped=True)
            return "stopped", self.keep_what_was_learnt(e)
        self.result = TrainResult(self.trainer.step, list(self.trainer.losses), stopped=stopped)
        if stopped and not self.control.save_on_stop:
            return "stopped", None
        if self.trainer.step > 0 and self.job.saved_step != self.trainer.step:
            self.save()
        if self.options.preview_every:
            self.preview()
        return ("stopped" if stopped else "finished"), None

    def loop(self) -> bool:
        """The optimizer steps; True when stopped by the job's Stop."""
        trainer, cfg, control = self.trainer, self.cfg, self.control
        clock = StepClock(trainer.step)
        while trainer.step < cfg.steps:
            if control.paused:
                control.wait_while_paused()
                clock = StepClock(trainer.step)   # it/s over running time only
            if control.stop_requested:
                return True
            with self.model_turn():
                if self.job.test_hook is not None:
                    self.job.test_hook(self.job)
                trainer.zero_grad()
                loss = 0.0
                for _ in range(cfg.grad_accum):
                    pairs = choose_examples(trainer, self.pairs, self.examples)
                    loss += self.task.run_pairs(pairs, trainer.objective).loss / cfg.grad_accum
                    if self.retention is not None:  # on-policy retention: maybe one ordinary prompt too
                        kept = self.retention.after(pairs[0], trainer.objective)
                        loss += kept.loss / cfg.grad_accum if kept is not None else 0.0
                trainer.update(loss)
            self.job.step_done(trainer.progress(loss, clock))
            refuse_blind_teacher(cfg.method, self.job.losses)
            if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
                self.save()
            if self.options.preview_every and trainer.step % self.options.preview_every == 0:
                self.preview()
        return False

    def model_turn(self):
        return turns.TURN.trainer_step() if self.job.use_turns else contextlib.nullcontext()

    # -- between steps: save, preview -------------------------------------------------------------------
    def save(self):
        """Exact-resume state to the job folder; the LoRA (never overwriting) when the job has a save_prefix."""
        step = self.trainer.step
        os.makedirs(self.options.job_dir, exist_ok=True)
        state = ckpt.save_checkpoint(os.path.join(self.options.job_dir, "training_state.pt"), self.trainer)
        if self.options.save_prefix:
            path = os.path.join(folder_paths.get_folder_paths("loras")[0],
                                f"{self.options.save_prefix}_step{step:05d}.safetensors")
            self.job.checkpoint_saved(self.job.save_lora(path, overwrite=False), step, True)
        else:
            self.job.checkpoint_saved(state, step, False)

    def preview(self):
        if self.vae is None or self.options.inference_sigmas is None:
            return
        step = self.trainer.step
        with self.model_turn():
            samples = sample_pair(self.model, self.net, self.pairs[0], self.options.inference_sigmas, self.cfg.seed)
            with torch.no_grad():
                images = {role: decode_images(self.vae, latent) for role, latent in samples.items()}
        refs = {role: image_ref(img, self.job.job_id, f"{role}_step{step:05d}") for role, img in images.items()}
        self.job.preview_ready(step, refs)

    def keep_what_was_learnt(self, e: ModelLost) -> str:
        """The model is gone for good: save the LoRA if there is something new to save; returns the reason."""
        step, saved = self.trainer.step, ""
        if step > 0 and self.options.save_prefix and self.job.saved_step != step:
            try:
                self.save()
            except Exception as save_error:  # the reason for the stop still reaches the user
                saved = f" Saving the LoRA failed too: {type(save_error).__name__}: {save_error}."
        if self.job.lora_path and not saved:
            saved = f" The LoRA of step {self.job.saved_step} is saved as {self.job.lora_path}."
        elif not saved:
            saved = " The LoRA is kept in memory: save it with D-OPSD Save LoRA."
        logging.warning("D-OPSD job %s stopped: %s", self.job.job_id, e)
        return f"stopped at step {step}: {e}.{saved}"

    def release(self):
        """Drop everything heavy; the LoRA goes to the CPU (the job keeps it for Save LoRA)."""
        if self.model is not None:
            lora_patch.uninstall(self.model)
        with torch.no_grad():
            self.net.to("cpu")
        self.model = self.trainer = self.task = self.pairs = self.pairs_in = self.vae = self.attachment = None
        self.examples = self.retention = None
