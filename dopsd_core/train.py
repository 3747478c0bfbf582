"""The training loop shared by the ComfyUI trainer and the toy world.

The loop owns what every method has in common: data order and noise from one seeded generator,
gradient accumulation, bf16 autocast, clipping, the NaN/inf guard, the optimizer and lr schedule,
the EMA teacher update, checkpoints with exact resume, progress callbacks and the cooperative
stop/pause flags. The host supplies a `TrainTask`: how to build the student/teacher velocity functions
for one training example and where it runs (ComfyUI runs each step inside its own sampling path).
"""
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch

from . import objectives
from .control import TrainControl
from .lora import LoRANetwork
from .optim import make_optimizer, make_scheduler
from .schedules import sample_training_sigmas

METHODS = ("dopsd", "sft", "off_policy")
PRECISIONS = ("fp32", "bf16")


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/inf; no update was applied."""


@dataclass
class TrainConfig:
    method: str = "dopsd"                    # dopsd (paper) | sft | off_policy (baselines)
    steps: int = 500                         # optimizer steps
    rollout_sigmas: Sequence[float] = (1.0, 0.9, 0.75, 0.5)  # K states (official: 4 of Z-Image's 8)
    loss_space: str = "velocity"             # velocity (paper) | x0 (official code)
    loss_steps: Optional[Sequence[int]] = None
    detach_states: bool = True               # official code: no backprop through the rollout
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0                   # 0 disables clipping
    grad_accum: int = 1
    precision: str = "fp32"                  # bf16 = autocast; LoRA weights stay fp32 masters
    seed: int = 0
    sft_shift: float = 3.0                   # SFT noise levels as ComfyUI's trainer draws them
    save_every: int = 0                      # checkpoint every N steps (0: only at the end/stop)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        if not self.rollout_sigmas or any(not 0.0 < float(s) <= 1.0 for s in self.rollout_sigmas):
            raise ValueError("rollout_sigmas must be non-empty and in (0, 1]")
        objectives.DOPSDOptions(self.loss_space, self.loss_steps, self.detach_states)  # validates

    def loss_options(self) -> objectives.DOPSDOptions:
        return objectives.DOPSDOptions(self.loss_space, self.loss_steps, self.detach_states)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rollout_sigmas"] = [float(s) for s in self.rollout_sigmas]
        return d


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Compute = Callable[[VelocityFn, VelocityFn, torch.Tensor], objectives.StepResult]


class TrainTask(Protocol):
    """What the host provides: the examples and how to predict velocities for one of them."""

    def __len__(self) -> int: ...

    def run(self, index: int, compute: Compute) -> objectives.StepResult:
        """Build student/teacher velocity fns for example `index` and call compute(student, teacher, x0)."""


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    its_per_sec: float
    eta_s: float


@dataclass
class TrainResult:
    step: int
    losses: List[float] = field(default_factory=list)
    stopped: bool = False


class Trainer:
    """Runs `cfg.steps` optimizer steps of `cfg.method` on `net` over `task`, resumable at any step."""

    def __init__(self, net: LoRANetwork, task: TrainTask, cfg: TrainConfig, control: Optional[TrainControl] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 on_checkpoint: Optional[Callable[[int], None]] = None,
                 step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 on_resume: Optional[Callable[[], None]] = None, device=None):
        if len(task) == 0:
            raise ValueError("the training set is empty: add image-caption pairs")
        self.net, self.task, self.cfg = net, task, cfg
        self.control = control or TrainControl()
        self.on_progress, self.on_checkpoint = on_progress, on_checkpoint
        self.step_context, self.on_resume = step_context, on_resume
        self.device = device
        self.params = net.trainable_parameters()
        self.optimizer = make_optimizer(self.params, cfg.optimizer, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # dropout and anything else drawing from the global RNG
        self.step = 0
        self.losses: List[float] = []
        self.opts = cfg.loss_options()
        self.sigmas = torch.tensor([float(s) for s in cfg.rollout_sigmas])

    # -- one optimizer step ------------------------------------------------------------------------
    def _compute(self, student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor) -> objectives.StepResult:
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)
        scale = 1.0 / self.cfg.grad_accum
        with self._autocast(x0.device):
            if self.cfg.method == "dopsd":
                return objectives.dopsd_step(student, teacher, noise, self.sigmas, self.opts, scale)
            if self.cfg.method == "off_policy":
                return objectives.off_policy_step(student, teacher, x0, noise, self.sigmas, self.opts, scale)
            sigma = sample_training_sigmas(x0.shape[0], self.cfg.sft_shift, self.generator)
            return objectives.sft_step(student, x0, noise, sigma, self.opts, scale)

    def _autocast(self, device):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> float:
        """Accumulate grad_accum micro-steps, guard, clip, step, update the EMA teacher."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for _ in range(self.cfg.grad_accum):
            index = int(torch.randint(len(self.task), (1,), generator=self.generator))
            loss += self.task.run(index, self._compute).loss / self.cfg.grad_accum
        bad = not math.isfinite(loss) or any(p.grad is not None and not torch.isfinite(p.grad).all()
                                             for p in self.params)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss became {loss} at step {self.step + 1}: no update was applied. Lower the learning rate "
                f"(now {self.cfg.lr:g}), use fp32 precision, or check the training images; the last good "
                "checkpoint is kept")
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.net.ema_update(self.step)
        self.step += 1
        self.losses.append(loss)
        return loss

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        started, start_step = time.perf_counter(), self.step
        while self.step < self.cfg.steps:
            if self.control.paused and self.control.wait_while_paused() and self.on_resume:
                self.on_resume()
            if self.control.stop_requested:
                return TrainResult(self.step, self.losses, stopped=True)
            with self.step_context():
                loss = self.train_step()
            if self.on_progress:
                done = self.step - start_step
                rate = done / max(time.perf_counter() - started, 1e-9)
                self.on_progress(Progress(self.step, self.cfg.steps, loss, self.scheduler.get_last_lr()[0],
                                          rate, (self.cfg.steps - self.step) / max(rate, 1e-9)))
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.on_checkpoint:
                self.on_checkpoint(self.step)
        return TrainResult(self.step, self.losses, stopped=False)

    # -- exact resume ------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "lora_names": list(self.net.names),
            "lora": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: Dict):
        if list(state["lora_names"]) != list(self.net.names):
            raise ValueError("checkpoint was made for different LoRA target modules; build the network with the "
                             "same rank/targets as the checkpoint's config")
        self.net.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
