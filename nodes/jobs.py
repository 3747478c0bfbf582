"""Background training jobs over the model already loaded in ComfyUI.

A job owns a clone of the user's ModelPatcher (sharing its weights), a LoRANetwork injected into that
clone, and a thread running dopsd_core's Trainer. Each optimizer step runs inside the model turn (see
comfy_bridge/turns.py) and through ComfyUI's sampling path (comfy_bridge/guided.py). The thread never
touches ComfyUI's ProgressBar or interrupt flag; it reports through `send_sync` events and the job
status that the HTTP routes serve. Job state lives at module level because V3 node classes are cloned
per execution.

What the job does when ComfyUI does its everyday things:
- Cancel (`/interrupt`): the job thread is shielded from ComfyUI's interrupt checks (interrupts.py), so the
  flag stays for the prompt it was meant for; only the job's own Stop stops a job.
- Unload / free memory / another model loading: ComfyUI ejects the job's LoRA with the model. The worker's
  unloads happen inside its turn (turns.py), so the next step re-loads the model and re-attaches the LoRA.
  A step that lost its LoRA midway (an unload from elsewhere) is discarded and retried; a model that cannot
  be loaded back stops the job with its LoRA saved and the reason in `error`.
- A finished, stopped or failed job releases its model clone, optimizer, latents and VAE at once and keeps
  only its status and its (CPU) LoRA; the oldest ended jobs beyond MAX_ENDED_JOBS are forgotten.
"""
import contextlib
import logging
import os
import threading
import traceback
import uuid
from typing import Dict, List, Optional

import folder_paths
import numpy as np
import torch
from PIL import Image

from ..dopsd_core import checkpoint as ckpt
from ..dopsd_core import lora_io, sampler
from ..dopsd_core.control import TrainControl
from ..dopsd_core.train import TrainConfig, Trainer
from . import events
from .comfy_bridge import blocks, guided, interrupts, lora_patch, memory, turns
from .pairs import Pair, detached_copy

JOBS: Dict[str, "Job"] = {}
_LOCK = threading.Lock()
MAX_CHART_POINTS = 500
FINAL_STATES = ("finished", "stopped", "error")
ACTIVE_STATES = ("waiting", "running", "paused", "stopping")
MAX_ENDED_JOBS = 20       # ended jobs whose status stays available (each keeps only its LoRA, on the CPU)
MAX_STEP_ATTEMPTS = 3     # tries of one step whose model was unloaded midway, before the job gives up


class ModelLost(RuntimeError):
    """The job's model was unloaded and could not be used again; the job stops with its LoRA saved."""


class ComfyTask:
    """dopsd_core TrainTask over ComfyUI pairs: each example runs inside guider.sample.

    Before each example the job's patcher is loaded with the working memory training needs
    (memory.py), which also re-attaches the LoRA after ComfyUI unloaded the model. An example during
    which ComfyUI ejected the LoRA (the model was unloaded midway) is discarded, gradients restored, and
    run again; after MAX_STEP_ATTEMPTS such tries, or when the model cannot be loaded, ModelLost.
    """

    def __init__(self, model, net, pairs: List[Pair], seed: int, attachment=None, checkpointing: bool = False,
                 precision: str = "fp32"):
        self.model, self.net, self.pairs, self.seed = model, net, pairs, seed
        self.attachment = attachment
        self.checkpointing, self.precision = checkpointing, precision
        self.memory_required: Dict[tuple, int] = {}

    def __len__(self):
        return len(self.pairs)

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

    def run(self, index, compute):
        return self.run_pair(self.pairs[index], compute)

    def run_pair(self, pair: Pair, compute):
        params = self.net.trainable_parameters()
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            self._load(pair)
            outcome = {"lost": False}
            try:
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


def _image_ref(images: torch.Tensor, job_id: str, name: str) -> dict:
    """Save the first image of [B,H,W,3] into ComfyUI's temp dir; returns an /view ImageRef."""
    sub = os.path.join("dopsd", job_id)
    folder = os.path.join(folder_paths.get_temp_directory(), sub)
    os.makedirs(folder, exist_ok=True)
    array = (images[0].detach().clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    filename = f"{name}.png"
    Image.fromarray(array).save(os.path.join(folder, filename))
    return {"filename": filename, "subfolder": sub, "type": "temp"}


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


BLIND_TEACHER_STEPS = 3


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


class Job:
    def __init__(self, model, net, pairs: List[Pair], cfg: TrainConfig, *, node_id: str = "", prompt_id: str = "",
                 vae=None, inference_sigmas: Optional[torch.Tensor] = None, preview_every: int = 0,
                 save_prefix: str = "", base_model_name: str = "", resume_from: str = "",
                 gradient_checkpointing: bool = False, use_turns: bool = True, origin=None, retention=None):
        self.job_id = uuid.uuid4().hex[:12]
        self.model, self.net, self.cfg = model, net, cfg
        self.pairs_in = pairs
        self.pairs: Optional[List[Pair]] = None
        self.vae, self.node_id, self.prompt_id = vae, node_id, prompt_id
        self.inference_sigmas = inference_sigmas
        self.preview_every, self.save_prefix = preview_every, save_prefix
        self.base_model_name, self.resume_from = base_model_name, resume_from
        self.gradient_checkpointing = gradient_checkpointing
        self.use_turns = use_turns
        self.retention = retention  # retention_nodes.for_job's spec, or None
        self.origin = origin  # what started it (trainer_nodes.job_origin): an unchanged re-queue shows this job
        self.control = TrainControl()
        self.state = "waiting"
        self.step, self.loss, self.its_per_sec, self.eta_s = 0, None, 0.0, None
        self.losses: List[List[float]] = []
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.checkpoints: List[str] = []
        self.saved_step: Optional[int] = None   # the step of the last LoRA file written under save_prefix
        self.lora_path: Optional[str] = None
        self.previews = None
        self.trainer: Optional[Trainer] = None   # released when the job ends; `result` stays
        self.result = None                        # dopsd_core TrainResult (step, losses, stopped)
        self.attachment = None
        self.done = threading.Event()
        self.test_hook = None  # tests: called before every step (e.g. to simulate a crash)
        self.job_dir = os.path.join(folder_paths.get_output_directory(), "dopsd_jobs", self.job_id)
        self.thread = threading.Thread(target=self._run, name=f"dopsd-job-{self.job_id}", daemon=True)

    # -- status -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def status(self) -> dict:
        losses = self.losses
        if len(losses) > MAX_CHART_POINTS:
            stride = len(losses) / MAX_CHART_POINTS
            losses = [losses[int(i * stride)] for i in range(MAX_CHART_POINTS - 1)] + [losses[-1]]
        return {"job_id": self.job_id, "node_id": self.node_id, "prompt_id": self.prompt_id,
                "method": self.cfg.method, "state": self.state, "step": self.step, "total_steps": self.cfg.steps,
                "loss": self.loss, "its_per_sec": self.its_per_sec, "eta_s": self.eta_s, "losses": list(losses),
                "error": self.error, "checkpoints": list(self.checkpoints), "lora_path": self.lora_path,
                "previews": self.previews}

    def _set_state(self, state: str, error: Optional[str] = None):
        self.state = state
        if error is not None:
            self.error = error
        events.send("dopsd.state", self.status())

    # -- control (HTTP routes, nodes) ---------------------------------------------------------------
    def pause(self):
        if self.state not in ("running", "waiting"):
            raise RuntimeError(f"job {self.job_id} is {self.state}; only a running job can be paused")
        self.control.pause()
        self._set_state("paused")

    def resume(self):
        if self.state != "paused":
            raise RuntimeError(f"job {self.job_id} is {self.state}; only a paused job can be resumed")
        self.control.resume()
        self._set_state("running")

    def stop(self, save: bool = True):
        if self.state in FINAL_STATES:
            raise RuntimeError(f"job {self.job_id} already ended ({self.state})")
        if self.state == "stopping":
            raise RuntimeError(f"job {self.job_id} is already stopping")
        self.control.stop(save)
        self._set_state("stopping")

    # -- saving -------------------------------------------------------------------------------------
    def lora_state_dict(self, which: str = "student") -> dict:
        with self._snapshot_lock():
            return self.net.comfy_state_dict(which=which)

    def metadata(self) -> dict:
        return lora_io.lora_metadata(self.cfg.method, self.base_model_name, self.net.loras[0].rank,
                                     self.net.loras[0].alpha, self.step, self.cfg.to_dict())

    def save_lora(self, path: str, overwrite: bool = False) -> str:
        with self._snapshot_lock():
            sd, meta = self.net.comfy_state_dict(), self.metadata()
        return lora_io.save_comfy_lora(path, sd, meta, overwrite=overwrite)

    @contextlib.contextmanager
    def _snapshot_lock(self):
        # LoRA tensors change only inside optimizer steps, which run one at a time under the turn.
        if (self.use_turns and not self.done.is_set() and not turns.TURN.worker_holds
                and threading.current_thread() is not self.thread):
            with turns.TURN.trainer_step():
                yield
        else:
            yield

    def _lora_file(self, step: int) -> str:
        return os.path.join(folder_paths.get_folder_paths("loras")[0], f"{self.save_prefix}_step{step:05d}.safetensors")

    def _checkpoint(self, step: int):
        os.makedirs(self.job_dir, exist_ok=True)
        state = ckpt.save_checkpoint(os.path.join(self.job_dir, "training_state.pt"), self.trainer)
        if self.save_prefix:
            path = self.save_lora(self._lora_file(step), overwrite=False)
            self.checkpoints.append(path)
            self.lora_path, self.saved_step = path, step
        else:
            self.checkpoints.append(state)
        events.send("dopsd.state", self.status())

    # -- the thread -------------------------------------------------------------------------------
    def start(self):
        with _LOCK:
            JOBS[self.job_id] = self
            _forget_old_jobs()
        if self.use_turns:
            turns.install_from_server()
        interrupts.install()
        self.thread.start()
        return self

    @contextlib.contextmanager
    def _step_context(self):
        """What surrounds one optimizer step: the model turn, training flags, optional checkpointing."""
        with contextlib.ExitStack() as stack:
            if self.use_turns:
                stack.enter_context(turns.TURN.trainer_step())
            stack.enter_context(guided.training_flags())
            stack.callback(blocks.guard_blocks(self.model, self.net, self.gradient_checkpointing).remove)
            if self.test_hook is not None:
                self.test_hook(self)
            yield

    def _on_progress(self, p):
        self.step, self.loss, self.its_per_sec, self.eta_s = p.step, p.loss, p.its_per_sec, p.eta_s
        self.losses.append([p.step, p.loss])
        refuse_blind_teacher(self.cfg.method, self.losses)
        if self.state == "waiting":
            self._set_state("running")
        events.send("dopsd.progress", {"job_id": self.job_id, "node_id": self.node_id, "step": p.step,
                                        "total_steps": p.total, "loss": p.loss, "its_per_sec": p.its_per_sec,
                                        "eta_s": p.eta_s, "state": self.state})
        if self.preview_every and p.step % self.preview_every == 0:
            self.make_previews()

    def make_previews(self):
        if self.vae is None or self.inference_sigmas is None:
            return
        with contextlib.ExitStack() as stack:
            if self.use_turns:
                stack.enter_context(turns.TURN.trainer_step())
            samples = sample_pair(self.model, self.net, self.pairs[0], self.inference_sigmas, self.cfg.seed)
            with torch.no_grad():
                images = {m: self.vae.decode(lat) for m, lat in samples.items()}
        refs = {m: _image_ref(img, self.job_id, f"{m}_step{self.step:05d}") for m, img in images.items()}
        self.previews = {"step": self.step, **refs}
        events.send("dopsd.preview", {"job_id": self.job_id, "node_id": self.node_id, "step": self.step, **refs})

    def _train(self):
        """Build the trainer over the job's patcher and run it; returns dopsd_core's TrainResult."""
        from . import retention_nodes
        self.pairs = detached_copy(self.pairs_in)
        self.attachment = lora_patch.install(self.model, self.net)
        task = ComfyTask(self.model, self.net, self.pairs, self.cfg.seed, self.attachment,
                         self.gradient_checkpointing, self.cfg.precision)
        task = retention_nodes.with_retention(task, self.retention, self.cfg.seed)  # None: unchanged
        self.trainer = Trainer(self.net, task, self.cfg, control=self.control, on_progress=self._on_progress,
                               on_checkpoint=self._checkpoint, step_context=self._step_context)
        if self.resume_from:
            try:
                ckpt.load_checkpoint(self.resume_from, self.trainer)
            except Exception as e:
                raise ValueError(f"cannot resume from {self.resume_from}: it is not a training_state.pt of "
                                 f"a job with the same settings ({type(e).__name__}: {e})") from e
            self.step = self.trainer.step
            retention_nodes.after_resume(task, self.trainer)
        return self.trainer.train()

    def _run(self):
        try:
            with interrupts.shielded(), torch.inference_mode(False), torch.enable_grad():
                try:
                    result = self.result = self._train()
                except ModelLost as e:
                    self._stop_model_lost(e)
                    return
                if result.stopped and not self.control.save_on_stop:
                    self._set_state("stopped")
                    return
                if self.save_prefix and self.saved_step != self.step:
                    self._checkpoint(self.step)
                if self.preview_every:
                    self.make_previews()
            self._set_state("stopped" if result.stopped else "finished")
        except Exception as e:  # reaches the user as job state + event + log, never silently
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            logging.error("D-OPSD job %s failed at step %d:\n%s", self.job_id, self.step, self.traceback)
            self._set_state("error", self.error)
        finally:
            try:
                self._release()
            finally:
                self.done.set()
                with _LOCK:
                    _forget_old_jobs()

    def _stop_model_lost(self, e: ModelLost):
        """The model is gone for good: keep what was learnt, say why."""
        saved = ""
        if self.step > 0 and self.save_prefix and self.saved_step != self.step:
            try:
                self._checkpoint(self.step)
            except Exception as save_error:  # the reason for the stop still reaches the user
                saved = f" Saving the LoRA failed too: {type(save_error).__name__}: {save_error}."
        if self.lora_path and not saved:
            saved = f" The LoRA of step {self.saved_step} is saved as {self.lora_path}."
        elif not saved:
            saved = " The LoRA is kept in memory: save it with D-OPSD Save LoRA."
        logging.warning("D-OPSD job %s stopped: %s", self.job_id, e)
        self._set_state("stopped", f"stopped at step {self.step}: {e}.{saved}")

    def _release(self):
        """Drop everything heavy at once; the status and the (CPU) LoRA stay for the routes and Save LoRA."""
        if self.model is not None:
            lora_patch.uninstall(self.model)
        with torch.no_grad():
            self.net.to("cpu")
        self.model = self.trainer = self.pairs = self.pairs_in = self.vae = None
        self.attachment = self.origin = None

    def wait(self, timeout=None) -> bool:
        return self.done.wait(timeout)


def _forget_old_jobs():
    """Keep the newest MAX_ENDED_JOBS ended jobs (caller holds _LOCK)."""
    ended = [job_id for job_id, job in JOBS.items() if job.done.is_set()]
    for job_id in ended[: max(0, len(ended) - MAX_ENDED_JOBS)]:
        del JOBS[job_id]


def get(job_id: str) -> Job:
    job = JOBS.get(job_id)
    if job is None:
        raise KeyError(f"no D-OPSD job with id {job_id!r} (ended jobs are kept {MAX_ENDED_JOBS} at most, and "
                       f"none survive a restart); known jobs: {', '.join(JOBS) or 'none'}")
    return job


def all_jobs() -> List[Job]:
    return list(JOBS.values())


def active_jobs() -> List[Job]:
    return [j for j in all_jobs() if j.active]
