"""The training step shared by every host: the ComfyUI job (nodes/comfy_bridge/training.py), the torchrun
launcher (scripts/dopsd_torchrun.py, through distributed.DistributedTrainer) and the toy world.

`Trainer` owns what every method has in common: data order and noise from one seeded generator, gradient
accumulation, bf16 autocast, clipping, the NaN/inf guard, the optimizer and lr schedule, the EMA teacher update
and the exact-resume state. The host supplies a `TrainTask`: how to build the student/teacher velocity
functions for training examples and where they run (ComfyUI runs them inside its own sampling path).
A host either calls `train()` (the loop below: stop/pause, one per-step callback, checkpoints in a folder)
or drives the same pieces itself: `next_batch()`, `micro_step(batch)` / `objective`, `update(loss)` (the
ComfyUI job does, to take ComfyUI's model turn around each step and save / preview between steps).

One optimizer step = `grad_accum` micro-steps; each micro-step runs one batch through the method:
- dopsd:      K student forward+backward and K teacher forwards on the student's own rollout (paper).
- off_policy: the same K student/teacher passes, on noised target images instead of the rollout.
- sft:        `sft_draws` (default K, the same student budget) flow-matching steps on the target images.
"""
import contextlib
import dataclasses
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch

from . import objectives
from .checkpoint import CheckpointManager, capture_rng, restore_rng, FORMAT
from .control import TrainControl
from .data import BatchOrder
from .lora import LoRANetwork
from .optim import LR_SCHEDULES, OPTIMIZERS, make_optimizer, make_scheduler
from .schedules import sample_training_sigmas

METHODS = ("dopsd", "sft", "off_policy")
PRECISIONS = ("fp32", "bf16")


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/inf; no update was applied and no checkpoint was written."""


@dataclass
class TrainConfig:
    method: str = "dopsd"                    # dopsd (paper) | sft | off_policy (baselines)
    steps: int = 500                         # optimizer steps
    batch_size: int = 1                      # examples per micro-step (same bucket); >1 needs task.run_batch
    rollout_sigmas: Sequence[float] = (1.0, 0.9, 0.75, 0.5)  # K states (official: 4 of Z-Image's 8)
    loss_space: str = "velocity"             # velocity (paper) | x0 (official code)
    loss_steps: Optional[Sequence[int]] = None  # rollout states carrying loss (None: all)
    detach_states: bool = True               # official code: no backprop through the rollout
    lr: float = 1e-4                         # official Z-Image LoRA script: 1e-4
    weight_decay: float = 0.0                # official scripts: 0.0
    optimizer: str = "adamw"                 # adamw | adamw8bit (bitsandbytes)
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"            # constant (official) | cosine | linear
    min_lr_factor: float = 0.0               # floor of cosine/linear decay, as a fraction of lr
    grad_clip: float = 1.0                   # official max_grad_norm 1.0; 0 disables clipping
    grad_accum: int = 1
    precision: str = "fp32"                  # bf16 = autocast; LoRA weights stay fp32 masters
    seed: int = 0
    ema_decay: Optional[float] = None        # None: keep the LoRANetwork's (default 0.9999, official scripts)
    ema_warmup: Optional[bool] = None        # None: keep the LoRANetwork's
    sft_shift: float = 3.0                   # SFT noise levels as ComfyUI's trainer draws them
    sft_draws: Optional[int] = None          # SFT passes per example per step; None: K (same budget as D-OPSD)
    save_every: int = 0                      # checkpoint every N steps (0: only at the end/stop)
    keep_checkpoints: int = 3                # with Trainer(checkpoint_dir=...): newest N kept (0: all)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.steps < 1 or self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("steps, grad_accum and batch_size must be >= 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not self.rollout_sigmas or any(not 0.0 < float(s) <= 1.0 for s in self.rollout_sigmas):
            raise ValueError("rollout_sigmas must be non-empty and in (0, 1]")
        if any(float(a) <= float(b) for a, b in zip(self.rollout_sigmas, list(self.rollout_sigmas)[1:])):
            raise ValueError("rollout_sigmas must decrease (a sampler goes from noise towards the image)")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.sft_draws is not None and self.sft_draws < 1:
            raise ValueError("sft_draws must be >= 1 (or None for K)")
        objectives.DOPSDOptions(self.loss_space, self.loss_steps, self.detach_states)  # validates

    def loss_options(self) -> objectives.DOPSDOptions:
        return objectives.DOPSDOptions(self.loss_space, self.loss_steps, self.detach_states)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rollout_sigmas"] = [float(s) for s in self.rollout_sigmas]
        d["betas"] = [float(b) for b in self.betas]
        d["loss_steps"] = None if self.loss_steps is None else [int(i) for i in self.loss_steps]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Unknown keys (settings of older versions, e.g. preview_every) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Compute = Callable[[VelocityFn, Optional[VelocityFn], torch.Tensor], objectives.StepResult]


class TrainTask(Protocol):
    """What the host provides: the examples and how to predict velocities for them.

    run(index, compute): build student/teacher velocity fns for example `index` and return
        compute(student, teacher, x0), x0 being the example's target latent [B, ...] (for dopsd only its
        shape, dtype and device are used; the teacher sees the target through its condition).
    Optional, for batch_size > 1: run_batch(indices, compute) doing the same for several examples of one
        bucket at once, and bucket(index) -> a hashable size key (examples with equal keys are batched).
    """

    def __len__(self) -> int: ...

    def run(self, index: int, compute: Compute) -> objectives.StepResult: ...


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    its_per_sec: float
    eta_s: float
    grad_norm: float = 0.0
    epoch: int = 0


@dataclass
class TrainResult:
    step: int
    losses: List[float] = field(default_factory=list)
    stopped: bool = False
    checkpoint: Optional[str] = None        # the last checkpoint this run wrote (with checkpoint_dir)


class StepClock:
    """Steps per second since the clock started (restarted after a pause: the rate over running time only)."""

    def __init__(self, step: int):
        self.started, self.start_step = time.perf_counter(), step

    def rate(self, step: int) -> float:
        return (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)


class Trainer:
    """Runs `cfg.steps` optimizer steps of `cfg.method` on `net` over `task`, resumable at any step.

      control          TrainControl: stop/pause from other threads, checked between steps
      on_progress(p)   the one per-step callback, after every step, p: Progress
      checkpoint_dir   folder for step-numbered exact-resume checkpoints, written every cfg.save_every steps,
                       at the end and on a saving stop (newest cfg.keep_checkpoints kept)
    Raises TrainingDiverged (nothing applied, the last good checkpoint kept) on a non-finite loss or gradient.
    """

    def __init__(self, net: LoRANetwork, task: TrainTask, cfg: TrainConfig, control: Optional[TrainControl] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None, checkpoint_dir: Optional[str] = None):
        if len(task) == 0:
            raise ValueError("the training set is empty: add image-caption pairs")
        if cfg.batch_size > 1 and not hasattr(task, "run_batch"):
            raise ValueError(f"batch_size {cfg.batch_size} needs a task with run_batch(indices, compute); "
                             "use batch_size 1 with grad_accum for a larger effective batch")
        self.net, self.task, self.cfg = net, task, cfg
        self.control = control or TrainControl()
        self.on_progress = on_progress
        if cfg.ema_decay is not None:
            net.ema_decay = float(cfg.ema_decay)
        if cfg.ema_warmup is not None:
            net.ema_warmup = bool(cfg.ema_warmup)
        self.params = net.trainable_parameters()
        self.optimizer = make_optimizer(self.params, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps)
        self.scheduler = make_scheduler(self.optimizer, cfg.steps, cfg.warmup_steps, cfg.lr_schedule,
                                        cfg.min_lr_factor)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # dropout and anything else drawing from the global RNG
        buckets = [task.bucket(i) if hasattr(task, "bucket") else 0 for i in range(len(task))]
        self.order = BatchOrder(buckets, cfg.batch_size, cfg.seed)
        self.step = 0
        self.losses: List[float] = []
        self.grad_norm = 0.0
        self.run_id = uuid.uuid4().hex
        self.opts = cfg.loss_options()
        self.sigmas = torch.tensor([float(s) for s in cfg.rollout_sigmas])
        self.checkpoints = CheckpointManager(checkpoint_dir, cfg.keep_checkpoints) if checkpoint_dir else None
        self.last_checkpoint: Optional[str] = None
        # Host settings outside TrainConfig that decide the run (e.g. "retention": RetentionMix.settings()), as
        # plain values: saved with the state, so that after a resume the host can compare them with its own.
        self.extras: Dict[str, object] = {}
        self.resumed_extras: Optional[Dict] = None  # the loaded checkpoint's extras; None: older checkpoint / none
        self.resume_warnings: List[str] = []        # how this run's settings differ from the loaded checkpoint's

    # -- one micro-step ----------------------------------------------------------------------------
    def _noise(self, x0: torch.Tensor) -> torch.Tensor:
        """Drawn on the CPU generator, then moved: the same noise on every device, and resumable."""
        return torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)

    def objective(self, student: VelocityFn, teacher: Optional[VelocityFn], x0: torch.Tensor) -> objectives.StepResult:
        """cfg.method's loss on one batch (x0 [B, ...]) with noise from the trainer's generator; backward runs
        inside (scaled by 1 / grad_accum), so gradients accumulate in the LoRA."""
        scale = 1.0 / self.cfg.grad_accum
        with self._autocast(x0.device):
            if self.cfg.method == "dopsd":
                return objectives.dopsd_step(student, teacher, self._noise(x0), self.sigmas, self.opts, scale)
            if self.cfg.method == "off_policy":
                return objectives.off_policy_step(student, teacher, x0, self._noise(x0), self.sigmas, self.opts, scale)
            draws = self.cfg.sft_draws or len(self.sigmas)
            results = []
            for _ in range(draws):
                noise = self._noise(x0)
                sigma = sample_training_sigmas(x0.shape[0], self.cfg.sft_shift, self.generator)
                results.append(objectives.sft_step(student, x0, noise, sigma, self.opts, scale / draws))
            return objectives.StepResult(sum(r.loss for r in results) / draws, [r.loss for r in results],
                                         [s for r in results for s in r.states])

    def _autocast(self, device):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def next_batch(self) -> List[int]:
        """The example indices of the next micro-step: one bucket, seeded shuffle, every example once per epoch."""
        return self.order.next()

    def micro_step(self, batch: List[int]) -> float:
        """The objective on examples `batch` (one bucket) through the task; returns the batch's mean loss."""
        if len(batch) == 1 and (self.cfg.batch_size == 1 or not hasattr(self.task, "run_batch")):
            return self.task.run(batch[0], self.objective).loss
        return self.task.run_batch(batch, self.objective).loss

    # -- one optimizer step ------------------------------------------------------------------------
    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> float:
        """Accumulate grad_accum micro-steps, guard, clip, step, update the EMA teacher."""
        self.zero_grad()
        loss = 0.0
        for _ in range(self.cfg.grad_accum):
            loss += self.micro_step(self.next_batch()) / self.cfg.grad_accum
        return self.update(loss)

    def update(self, loss: float) -> float:
        """After the micro-steps: clip, then the optimizer / lr schedule / EMA step (or TrainingDiverged)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("no LoRA parameter received a gradient: is the LoRA attached to the model that the "
                               "task's velocity functions run, and in 'student' mode?")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0
                                                    else float("inf")))
        return self._apply_update(loss, norm, f"{'' if self.cfg.grad_clip > 0 else ', enable gradient clipping'}"
                                              ", or check the training images and conditions for NaNs")

    def _apply_update(self, loss: float, norm: float, advice: str, where: str = "") -> float:
        """The optimizer / scheduler / EMA step for clipped gradients, or TrainingDiverged (nothing applied, the
        last good checkpoint kept) when the loss or the gradient norm is not finite."""
        if not math.isfinite(loss) or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"the loss became {loss}" if not math.isfinite(loss) else f"a gradient became {norm}"
            raise TrainingDiverged(
                f"{what} at step {self.step + 1}{where}: no update was applied and the last good checkpoint is kept. "
                f"Lower the learning rate (now {self.cfg.lr:g}), train in fp32 instead of {self.cfg.precision}{advice}")
        self.optimizer.step()
        self.scheduler.step()
        self.net.ema_update(self.step)
        self.step += 1
        self.grad_norm = norm
        self.losses.append(loss)
        return loss

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train until cfg.steps, a stop request, or an error (TrainingDiverged leaves the last good
        checkpoint on disk and writes nothing)."""
        if self.checkpoints is not None:
            self.checkpoints.check_owner(self.run_id)
        clock = StepClock(self.step)
        while self.step < self.cfg.steps:
            if self.control.paused:
                self.control.wait_while_paused()
                clock = StepClock(self.step)  # rate over running time only
            if self.control.stop_requested:
                if self.control.save_on_stop and self.step > 0:
                    self._save()
                return TrainResult(self.step, self.losses, stopped=True, checkpoint=self.last_checkpoint)
            loss = self.train_step()
            if self.on_progress:
                self.on_progress(self.progress(loss, clock))
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                self._save()
        self._save()
        return TrainResult(self.step, self.losses, stopped=False, checkpoint=self.last_checkpoint)

    def progress(self, loss: float, clock: "StepClock") -> Progress:
        rate = clock.rate(self.step)
        return Progress(self.step, self.cfg.steps, loss, self.scheduler.get_last_lr()[0], rate,
                        (self.cfg.steps - self.step) / max(rate, 1e-9), self.grad_norm, self.order.epoch)

    def _save(self):
        if self.checkpoints is not None:
            self.last_checkpoint = self.checkpoints.save(self)

    # -- exact resume ------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "lora_names": list(self.net.names),
            "lora_alphas": [float(m.alpha) for m in self.net.loras],
            "lora_ranks": [int(m.rank) for m in self.net.loras],
            "lora": self.net.state_dict(),
            "ema": {"decay": self.net.ema_decay, "warmup": bool(self.net.ema_warmup)},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_order": self.order.state_dict(),
            "rng": capture_rng(self.generator),
            "losses": list(self.losses),
            "extras": dict(self.extras),
        }

    def load_state_dict(self, state: Dict):
        if list(state["lora_names"]) != list(self.net.names):
            raise ValueError("checkpoint was made for different LoRA target modules; build the network with the "
                             "same targets as the checkpoint's config")
        ranks = [int(m.rank) for m in self.net.loras]
        if list(state.get("lora_ranks", ranks)) != ranks:
            raise ValueError(f"checkpoint LoRA rank {state['lora_ranks'][0]} differs from this network's "
                             f"rank {ranks[0]}; build the network with the checkpoint's rank")
        current = self.cfg.to_dict()
        changed = [k for k, v in state["config"].items()
                   if k not in ("steps", "save_every", "keep_checkpoints") and current.get(k, v) != v]
        self.resume_warnings = []
        if changed:
            self.resume_warnings.append(f"resuming with settings that differ from the checkpoint's: "
                                        f"{', '.join(changed)}; the continuation will not match an uninterrupted run")
            warnings.warn(self.resume_warnings[-1])
        self.net.load_state_dict(state["lora"])
        for m, alpha in zip(self.net.loras, state.get("lora_alphas", [m.alpha for m in self.net.loras])):
            m.alpha = float(alpha)
        if "ema" in state and self.cfg.ema_decay is None:
            self.net.ema_decay, self.net.ema_warmup = float(state["ema"]["decay"]), bool(state["ema"]["warmup"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order.load_state_dict(state["data_order"])
        restore_rng(state["rng"], self.generator)
        self.step = int(state["step"])
        self.run_id = state["run_id"]
        self.losses = list(state["losses"])
        self.resumed_extras = dict(state["extras"]) if isinstance(state.get("extras"), dict) else None

    def resume(self, path: str) -> "Trainer":
        """Load a checkpoint file, or the latest checkpoint of a folder."""
        from .checkpoint import load_checkpoint
        load_checkpoint(path, self)
        return self
