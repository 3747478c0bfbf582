"""Background training jobs over the model already loaded in ComfyUI: the thread, its state, status and events.

A job owns a clone of the user's ModelPatcher (sharing its weights), a LoRANetwork injected into that clone, and
a thread that runs the job's training: comfy_bridge/training.py, the whole training step and the loop around it
in one file. This module only starts that thread, keeps the job's state and status (events.JobStatus, served by
routes.py), sends the `dopsd.*` events and answers Pause / Resume / Stop and Save LoRA. The thread never touches
ComfyUI's ProgressBar or interrupt flag. Job state lives at module level because V3 node classes are cloned per
execution.

What the job does when ComfyUI does its everyday things:
- Cancel (`/interrupt`): the job thread is shielded from ComfyUI's interrupt checks (interrupts.py), so the
  flag stays for the prompt it was meant for; only the job's own Stop stops a job.
- Unload / free memory / another model loading: ComfyUI ejects the job's LoRA with the model. The worker's
  unloads happen inside its turn (turns.py), so the next step re-loads the model and re-attaches the LoRA.
  A step that lost its LoRA midway (an unload from elsewhere) is discarded and retried; a model that cannot
  be loaded back stops the job with its LoRA saved and the reason in `error` (training.py).
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
import torch

from ..dopsd_core import lora_io
from ..dopsd_core.control import TrainControl
from ..dopsd_core.train import Progress, TrainConfig
from . import events
from .comfy_bridge import interrupts, turns
from .comfy_bridge.training import Options, Training
from .pairs import Pair

JOBS: Dict[str, "Job"] = {}
_LOCK = threading.Lock()
MAX_CHART_POINTS = 500
FINAL_STATES = ("finished", "stopped", "error")
ACTIVE_STATES = ("waiting", "running", "paused", "stopping")
MAX_ENDED_JOBS = 20       # ended jobs whose status stays available (each keeps only its LoRA, on the CPU)


class Job:
    def __init__(self, model, net, pairs: List[Pair], cfg: TrainConfig, *, node_id: str = "", prompt_id: str = "",
                 vae=None, inference_sigmas: Optional[torch.Tensor] = None, preview_every: int = 0,
                 save_prefix: str = "", base_model_name: str = "", resume_from: str = "",
                 gradient_checkpointing: bool = False, use_turns: bool = True, origin=None, retention=None):
        self.job_id = uuid.uuid4().hex[:12]
        self.net, self.cfg = net, cfg
        self.node_id, self.prompt_id = node_id, prompt_id
        self.save_prefix, self.base_model_name = save_prefix, base_model_name
        self.use_turns = use_turns
        self.origin = origin  # what started it (trainer_nodes.job_origin): an unchanged re-queue shows this job
        self.control = TrainControl()
        self.state = "waiting"
        self.step, self.loss, self.its_per_sec, self.eta_s = 0, None, 0.0, None
        self.losses: List[List[float]] = []
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.warnings: List[str] = []   # events.JobStatus.warnings: said to the user, the job goes on
        self.checkpoints: List[str] = []
        self.saved_step: Optional[int] = None   # the step of the last LoRA file written under save_prefix
        self.lora_path: Optional[str] = None
        self.previews = None
        self.result = None     # dopsd_core TrainResult (step, losses, stopped) once the training returned
        self.done = threading.Event()
        self.test_hook = None  # tests: called with the job inside the model turn before every step
        self.recipe_info: dict = {}  # recipe_bridge.job_info: the recipe and what it set (status, LoRA metadata)
        # the LoRA metadata's dopsd.retention: which on-policy retention the LoRA was trained with (None: none)
        self.retention_info = None if retention is None else {"ratio": retention["ratio"],
                                                              "prompts": list(retention["prompts"])}
        self.job_dir = os.path.join(folder_paths.get_output_directory(), "dopsd_jobs", self.job_id)  # training_state.pt
        self.training: Optional[Training] = Training(self, model, pairs, vae, Options(
            gradient_checkpointing=gradient_checkpointing, preview_every=preview_every, save_prefix=save_prefix,
            resume_from=resume_from, inference_sigmas=inference_sigmas, job_dir=self.job_dir, retention=retention))
        self.thread = threading.Thread(target=self._run, name=f"dopsd-job-{self.job_id}", daemon=True)

    # what the running training holds (None once the job ended and released it)
    model = property(lambda self: self.training and self.training.model)
    pairs = property(lambda self: self.training and self.training.pairs)
    pairs_in = property(lambda self: self.training and self.training.pairs_in)
    trainer = property(lambda self: self.training and self.training.trainer)

    # -- status -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def status(self) -> events.JobStatus:
        losses = self.losses
        if len(losses) > MAX_CHART_POINTS:
            stride = len(losses) / MAX_CHART_POINTS
            losses = [losses[int(i * stride)] for i in range(MAX_CHART_POINTS - 1)] + [losses[-1]]
        return events.JobStatus(
            job_id=self.job_id, node_id=self.node_id, prompt_id=self.prompt_id, method=self.cfg.method,
            state=self.state, step=self.step, total_steps=self.cfg.steps, loss=self.loss,
            its_per_sec=self.its_per_sec, eta_s=self.eta_s, losses=list(losses), error=self.error,
            warnings=list(self.warnings), checkpoints=list(self.checkpoints), lora_path=self.lora_path,
            previews=self.previews, recipe=events.RecipeInfo(**self.recipe_info))

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
        extra = dict(self.recipe_info)
        if self.retention_info is not None:
            extra["retention"] = self.retention_info
        return lora_io.lora_metadata(self.cfg.method, self.base_model_name, self.net.loras[0].rank,
                                     self.net.loras[0].alpha, self.step, self.cfg.to_dict(), **extra)

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

    # -- reports from the training (comfy_bridge/training.py), on the job's thread ----------------------
    def step_done(self, p: Progress):
        self.step, self.loss, self.its_per_sec, self.eta_s = p.step, p.loss, p.its_per_sec, p.eta_s
        self.losses.append([p.step, p.loss])
        if self.state == "waiting":
            self._set_state("running")
        events.send("dopsd.progress", events.ProgressEvent(
            job_id=self.job_id, node_id=self.node_id, step=p.step, total_steps=p.total, loss=p.loss,
            its_per_sec=p.its_per_sec, eta_s=p.eta_s, state=self.state))

    def checkpoint_saved(self, path: str, step: int, is_lora: bool):
        self.checkpoints.append(path)
        if is_lora:
            self.lora_path, self.saved_step = path, step
        events.send("dopsd.state", self.status())

    def warn(self, message: str):
        """Tell the user something that does not stop the job: the status's `warnings` (the card shows them) and
        the log."""
        self.warnings.append(message)
        logging.warning("D-OPSD job %s: %s", self.job_id, message)
        events.send("dopsd.state", self.status())

    def preview_ready(self, step: int, refs: dict):
        self.previews = events.Previews(step=step, **refs)
        events.send("dopsd.preview", events.PreviewEvent(job_id=self.job_id, node_id=self.node_id, step=step, **refs))

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

    def _run(self):
        final = ("error", None)
        try:
            with interrupts.shielded(), torch.inference_mode(False), torch.enable_grad():
                final = self.training.run()
            self.result = self.training.result
        except Exception as e:  # reaches the user as job state + event + log, never silently
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            logging.error("D-OPSD job %s failed at step %d:\n%s", self.job_id, self.step, self.traceback)
            final = ("error", self.error)
        finally:
            try:
                self._release()
            finally:  # the final state only once the model is released: "finished" means the model is free again
                self._set_state(*final)
                self.done.set()
                with _LOCK:
                    _forget_old_jobs()

    def _release(self):
        """Drop everything heavy at once; the status and the (CPU) LoRA stay for the routes and Save LoRA."""
        if self.training is not None:
            self.result = self.result or self.training.result
            self.training.release()
        self.training = self.origin = None

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
