"""LoRA training on several processes (torchrun, torch.distributed): data parallel, same result as one process.

What each rank holds and does (docs/scaling.md):
- replicated: the frozen base model, the LoRA student and EMA teacher, the optimizer state, the data order and
  the noise generator (all seeded alike, and restored alike from one checkpoint file);
- sharded: the examples. `cfg.batch_size` is the GLOBAL batch of one micro-step; rank r runs positions
  [r*b, (r+1)*b) of it (b = global batch / world size), one example at a time, through the host's task;
- after the micro-steps, one all-reduce sums the gradients (and the losses); every rank then divides by the
  number of examples and takes the same clipped optimizer step, so the replicas never drift apart.

Why the result equals one process with the same global batch: the order comes from the same BatchOrder, and
noise is drawn from the same sequential generator in global position order; a rank replays the draws of
the positions it does not run through the objective itself, with a stand-in velocity function (the draws
never depend on model outputs). With world size 1 and batch 1 this is exactly `train.Trainer` (the ComfyUI
node's loop), bit for bit.

Failure behaviour: every collective has the process group's timeout; a rank that dies makes the others'
next collective fail (at once on gloo/NCCL when the peer's socket closes, else at the timeout), a NaN on any
rank is a NaN of the all-reduced loss on every rank, and a stop request on any rank (Ctrl-C, SIGTERM from
torchrun) is agreed by all ranks at the next step boundary. Only rank 0 writes files, atomically.
"""
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .control import TrainControl
from .data import BatchOrder
from .train import TrainConfig, Trainer, TrainingDiverged  # noqa: F401  (raised on every rank; catch it here)

DEFAULT_TIMEOUT_S = 300.0


class RankFailure(RuntimeError):
    """Another rank died or stopped answering; this rank stopped too. The last checkpoint is intact."""


@dataclass
class DistEnv:
    """Where this process sits in the job. world_size 1 with no process group is a plain single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def init_from_env(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Without WORLD_SIZE (plain `python launcher.py`) or with WORLD_SIZE=1, returns a single-process DistEnv and
    creates no group. backend: None picks nccl when CUDA is available, else gloo. timeout_s bounds every
    collective: a rank that stops answering ends the others after at most this many seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistEnv(0, 1, 0, None, timeout_s)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a standard torch wheel")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local, backend, timeout_s)


def shutdown(env: DistEnv):
    if env.active:
        dist.destroy_process_group()


def _collective(env: DistEnv, what: str, fn):
    try:
        return fn()
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError included) are RuntimeErrors
        raise RankFailure(f"rank {env.rank}: another rank died or stopped answering during {what} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); all ranks stop. "
                          "The last checkpoint is intact: fix the cause and resume from it") from e


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """In-place sum over ranks (identity on one process). The collective device is the backend's:
    gloo reduces CPU tensors, NCCL CUDA tensors."""
    if env.active:
        _collective(env, what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def barrier(env: DistEnv, what: str = "barrier"):
    if env.active:
        # a barrier as a tiny all-reduce: same timeout and failure path as every other collective
        all_reduce_sum(env, torch.zeros(1, device=_comm_device(env)), what)


def broadcast_str(env: DistEnv, text: str, what: str = "broadcast") -> str:
    if not env.active:
        return text
    box = [text]
    _collective(env, what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def _comm_device(env: DistEnv) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if env.backend == "nccl" else torch.device("cpu")


class AgreedControl(TrainControl):
    """TrainControl whose stop is agreed by all ranks: one tiny all-reduce each time the loop looks at it,
    so every rank leaves the loop after the same step (and saves the same checkpoint). No pause: a
    distributed job runs or stops."""

    def __init__(self, env: DistEnv):
        super().__init__()
        self.env = env

    @property
    def stop_requested(self) -> bool:
        local = self._stop.is_set()
        if not self.env.active:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=_comm_device(self.env))
        return bool(all_reduce_sum(self.env, flag, "the stop check").item() > 0)

    @property
    def paused(self) -> bool:
        return False


class DistributedTrainer(Trainer):
    """`train.Trainer` with the global batch split over ranks (see the module docstring).

    cfg.batch_size: the global batch, a multiple of env.world_size (every rank gets the same share).
    example_shape(index) -> the shape of the example's target latent, used to replay the noise draws of examples another rank runs.
    Only rank 0 keeps checkpoints (checkpoint_dir) and calls on_progress.
    Raises RankFailure when a peer dies, TrainingDiverged on every rank when any rank's loss is not finite.
    """

    def __init__(self, net, task, cfg: TrainConfig, env: DistEnv, example_shape: Callable[[int], Sequence[int]],
                 checkpoint_dir: Optional[str] = None, **hooks):
        if cfg.batch_size % env.world_size:
            raise ValueError(f"the global batch ({cfg.batch_size}) does not split over {env.world_size} ranks: "
                             f"use a multiple of {env.world_size} (e.g. {env.world_size * max(1, cfg.batch_size // env.world_size)})")
        if not env.is_main:
            checkpoint_dir = None
            hooks = {k: v for k, v in hooks.items() if k != "on_progress"}
        # one example per task.run call; the base class must not ask the task for run_batch
        super().__init__(net, task, dataclasses.replace(cfg, batch_size=1), checkpoint_dir=checkpoint_dir, **hooks)
        self.cfg, self.env, self.example_shape = cfg, env, example_shape
        self.per_rank = cfg.batch_size // env.world_size
        self.sharded = bool(getattr(net, "sharded", False))  # FSDP2 full fine-tuning (full_finetune.FullWeights)
        buckets = [task.bucket(i) if hasattr(task, "bucket") else tuple(example_shape(i)) for i in range(len(task))]
        # sharded ranks must run the same number of forwards/backwards (FSDP collectives): only full batches
        self.order = BatchOrder(buckets, cfg.batch_size, cfg.seed, drop_last=self.sharded)
        self.run_id = broadcast_str(env, self.run_id, "the run id broadcast")
        self._stand_in = torch.zeros((), requires_grad=True)

    # -- which positions of a global batch this rank runs ------------------------------------------------
    def my_positions(self, batch_len: int) -> List[int]:
        """Contiguous positions; a short last batch of a bucket leaves later ranks with fewer (or none)."""
        first = self.env.rank * self.per_rank
        return [p for p in range(first, first + self.per_rank) if p < batch_len]

    def _replay_draws(self, index: int):
        """Advance the noise generator exactly as running example `index` would, without the model."""
        dummy = self._stand_in

        def stand_in(x, sigma):
            return x.detach() * 0 + dummy

        x0 = torch.zeros(tuple(self.example_shape(index)))
        with torch.enable_grad():
            self.objective(stand_in, stand_in, x0)
        dummy.grad = None

    def _micro_step(self, batch: List[int]) -> float:
        """Run my share of one global batch; returns the summed loss of my examples."""
        mine, loss = set(self.my_positions(len(batch))), 0.0
        for position, index in enumerate(batch):
            if position in mine:
                loss += self.task.run(index, self.objective).loss
            else:
                self._replay_draws(index)
        return loss

    # -- one optimizer step ---------------------------------------------------------------------------------
    def train_step(self) -> float:
        """grad_accum micro-steps of the global batch, one all-reduce, then the same update on every rank."""
        self.optimizer.zero_grad(set_to_none=True)
        # made after the first backward: the host may move the LoRA to the model's device during the first step
        accumulated = [None] * len(self.params)
        # FSDP already averaged each backward over ranks (reduce-scatter / world); plain grads are per rank
        reduced_by = self.env.world_size if self.sharded else 1
        local_loss = 0.0
        for _ in range(self.cfg.grad_accum):
            batch = self.order.next()
            loss_sum = self._micro_step(batch)
            local_loss += loss_sum / (len(batch) * self.cfg.grad_accum)
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    scaled = p.grad * (reduced_by / len(batch))
                    accumulated[i] = scaled if accumulated[i] is None else accumulated[i].add_(scaled)
                    p.grad = None
        accumulated = [torch.zeros_like(p) if a is None else a for a, p in zip(accumulated, self.params)]
        device = _comm_device(self.env)
        if self.sharded:
            flat = all_reduce_sum(self.env, torch.tensor([local_loss], device=device), "the loss all-reduce")
            for p, acc in zip(self.params, accumulated):
                p.grad = acc
        else:
            loss_t = torch.tensor([local_loss], device=accumulated[0].device)  # grads may live on a GPU
            flat = torch.cat([a.reshape(-1).float() for a in accumulated] + [loss_t]).to(device)
            all_reduce_sum(self.env, flat, "the gradient all-reduce")
            offset = 0
            for p, acc in zip(self.params, accumulated):
                n = acc.numel()
                p.grad = flat[offset:offset + n].view_as(acc).to(p.dtype).to(p.device)
                offset += n
        loss = float(flat[-1].cpu())
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0
                                              else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return self._apply_update(loss, norm, ", or check the exported set for NaNs",
                                  where=f" (on at least one of {self.env.world_size} ranks)")

    def _save(self):
        if self.sharded:  # gathering full tensors is a collective: every rank builds the state, rank 0 writes it
            state = self.state_dict()
            self.state_dict = lambda: state
            try:
                super()._save()
            finally:
                del self.state_dict
        else:
            super()._save()  # rank 0 only has a CheckpointManager (checkpoint_dir)
        barrier(self.env, "the checkpoint barrier")

    def state_dict(self):
        state = super().state_dict()
        if self.sharded:
            state["optimizer"] = self.net.full_optimizer_state(self.optimizer)
        state["world_size"] = self.env.world_size  # informational: resume works on any world size
        return state

    def load_state_dict(self, state):
        if not self.sharded:
            return super().load_state_dict(state)
        full_optimizer = state["optimizer"]
        super().load_state_dict(dict(state, optimizer=self.optimizer.state_dict()))
        self.net.load_full_optimizer_state(self.optimizer, full_optimizer)
