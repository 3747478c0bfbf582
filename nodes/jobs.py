"""Background training jobs over the model already loaded in ComfyUI.

A job owns a clone of the user's ModelPatcher (sharing its weights), a LoRANetwork injected into that
clone, and a thread running dopsd_core's Trainer. Each optimizer step runs inside the model turn (see
comfy_bridge/turns.py) and through ComfyUI's sampling path (comfy_bridge/guided.py). The thread never
touches ComfyUI's ProgressBar or interrupt flag; it reports through `send_sync` events and the job
status that the HTTP routes serve. Job state lives at module level because V3 node classes are cloned
per execution.
"""
import contextlib
import os
import threading
import time
import traceback
import uuid
from typing import Dict, List, Optional

import comfy.model_management
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..dopsd_core import checkpoint as ckpt
from ..dopsd_core import lora_io, sampler
from ..dopsd_core.control import TrainControl
from ..dopsd_core.train import TrainConfig, Trainer
from . import events
from .comfy_bridge import blocks, guided, lora_patch, turns
from .pairs import Pair, detached_copy

JOBS: Dict[str, "Job"] = {}
_LOCK = threading.Lock()
MAX_CHART_POINTS = 500
FINAL_STATES = ("finished", "stopped", "error")


class ComfyTask:
    """dopsd_core TrainTask over ComfyUI pairs: each example runs inside guider.sample."""

    def __init__(self, model, net, pairs: List[Pair], seed: int):
        self.model, self.net, self.pairs, self.seed = model, net, pairs, seed

    def __len__(self):
        return len(self.pairs)

    def run(self, index, compute):
        pair, net = self.pairs[index], self.net

        def body(model_wrap, model_options, latent, noise):
            student_v = guided.velocity_fn(model_wrap, model_options, "positive")
            teacher_v = guided.velocity_fn(model_wrap, model_options, "teacher")

            def student(x, s):
                with net.mode("student"):
                    return student_v(x, s)

            def teacher(x, s):
                with net.mode("teacher"):
                    return teacher_v(x, s)

            return compute(student, teacher, latent)

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
                 gradient_checkpointing: bool = False, use_turns: bool = True):
        self.job_id = uuid.uuid4().hex[:12]
        self.model, self.net, self.cfg = model, net, cfg
        self.pairs_in = pairs
        self.vae, self.node_id, self.prompt_id = vae, node_id, prompt_id
        self.inference_sigmas = inference_sigmas
        self.preview_every, self.save_prefix = preview_every, save_prefix
        self.base_model_name, self.resume_from = base_model_name, resume_from
        self.gradient_checkpointing = gradient_checkpointing
        self.use_turns = use_turns
        self.control = TrainControl()
        self.state = "waiting"
        self.step, self.loss, self.its_per_sec, self.eta_s = 0, None, 0.0, None
        self.losses: List[List[float]] = []
        self.error: Optional[str] = None
        self.checkpoints: List[str] = []
        self.lora_path: Optional[str] = None
        self.previews = None
        self.trainer: Optional[Trainer] = None
        self.done = threading.Event()
        self.test_hook = None  # tests: called before every step (e.g. to simulate a crash)
        self.job_dir = os.path.join(folder_paths.get_output_directory(), "dopsd_jobs", self.job_id)
        self.thread = threading.Thread(target=self._run, name=f"dopsd-job-{self.job_id}", daemon=True)

    # -- status -------------------------------------------------------------------------------------
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
        self.control.stop(save)
        self._set_state("stopping")

    # -- saving -------------------------------------------------------------------------------------
    def lora_state_dict(self, which: str = "student") -> dict:
        return self.net.comfy_state_dict(which=which)

    def metadata(self) -> dict:
        return lora_io.lora_metadata(self.cfg.method, self.base_model_name, self.net.loras[0].rank,
                                     self.net.loras[0].alpha, self.step, self.cfg.to_dict())

    def save_lora(self, path: str, overwrite: bool = False) -> str:
        with self._snapshot_lock():
            sd, meta = self.lora_state_dict(), self.metadata()
        return lora_io.save_comfy_lora(path, sd, meta, overwrite=overwrite)

    @contextlib.contextmanager
    def _snapshot_lock(self):
        # LoRA tensors change only inside optimizer steps, which run one at a time under the turn.
        if self.use_turns and not turns.TURN.worker_holds and threading.current_thread() is not self.thread:
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
            self.lora_path = path
        else:
            self.checkpoints.append(state)
        events.send("dopsd.state", self.status())

    # -- the thread -------------------------------------------------------------------------------
    def start(self):
        with _LOCK:
            JOBS[self.job_id] = self
        if self.use_turns:
            turns.install_from_server()
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
            self.state = "running"
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

    def _run(self):
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self.pairs = detached_copy(self.pairs_in)
                lora_patch.install(self.model, self.net)
                task = ComfyTask(self.model, self.net, self.pairs, self.cfg.seed)
                self.trainer = Trainer(self.net, task, self.cfg, control=self.control, on_progress=self._on_progress,
                                       on_checkpoint=self._checkpoint, step_context=self._step_context)
                if self.resume_from:
                    try:
                        ckpt.load_checkpoint(self.resume_from, self.trainer)
                    except Exception as e:
                        raise ValueError(f"cannot resume from {self.resume_from}: it is not a training_state.pt of "
                                         f"a job with the same settings ({type(e).__name__}: {e})") from e
                    self.step = self.trainer.step
                result = self.trainer.train()
            if result.stopped and not self.control.save_on_stop:
                self._set_state("stopped")
                return
            if self.save_prefix and (not self.checkpoints or self.checkpoints[-1] != self._lora_file(self.step)):
                self._checkpoint(self.step)
            if self.preview_every:
                with torch.inference_mode(False):
                    self.make_previews()
            self._set_state("stopped" if result.stopped else "finished")
        except Exception as e:  # reaches the user as job state + event, never silently
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            self._set_state("error", self.error)
        finally:
            try:
                lora_patch.uninstall(self.model)
            finally:
                self.done.set()

    def wait(self, timeout=None) -> bool:
        return self.done.wait(timeout)


def get(job_id: str) -> Job:
    job = JOBS.get(job_id)
    if job is None:
        raise KeyError(f"no D-OPSD job with id {job_id!r}; known jobs: {', '.join(JOBS) or 'none'}")
    return job


def all_jobs() -> List[Job]:
    return list(JOBS.values())
