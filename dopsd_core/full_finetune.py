"""Full fine-tuning for D-OPSD: the model's own weights are the student, their EMA is the teacher.

`FullWeights` stands where a LoRANetwork stands for `train.Trainer` / `distributed.DistributedTrainer`
(trainable_parameters, ema_update, mode(...), state_dict). With several ranks the transformer blocks are
sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter is a DTensor holding 1/world of
the weights, gradients are reduce-scattered in backward, the optimizer state is sharded alike, and the EMA
copy is made from the sharded parameters, so it is sharded exactly like them (no rank ever holds a full
EMA). The teacher pass swaps the EMA shards into the parameters and back (in place, no_grad), so the
sharded forward all-gathers the teacher's weights.

Checkpoints hold full (unsharded) tensors gathered to rank 0, so a run resumes on any world size.
"""
import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import lora

MODES = ("student", "teacher")


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    """Full tensor on the CPU (a collective for a DTensor: every rank must call it, in the same order)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().to("cpu").clone()


def _assign(param: torch.Tensor, full: torch.Tensor):
    """Copy a full tensor into a parameter or a DTensor (its own shard only; no communication)."""
    full = full.to(param.dtype)
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor
        local = distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full.to(param.device))


def shard_blocks(model: nn.Module, blocks: Sequence[nn.Module], mesh=None, mp_policy=None) -> nn.Module:
    """FSDP2: each block is its own sharding unit (all-gathered for its forward, resharded after), the
    rest of the model (embedders, final layer) one more unit at the root. Returns `model` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FullWeights:
    """The trainable weights of `model` (all parameters with requires_grad, or `names`), and their EMA teacher."""

    names: List[str] = []   # Trainer's LoRA bookkeeping: no LoRA modules here
    loras: List = []

    def __init__(self, model: nn.Module, ema_decay: float = 0.9999, ema_warmup: bool = False,
                 names: Optional[Callable[[str], bool]] = None):
        self.model = model
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad and (names is None or names(n))]
        if not self.param_names:
            raise ValueError("no trainable parameter: set requires_grad on the weights to fine-tune")
        table = dict(model.named_parameters())
        self.params = [table[n] for n in self.param_names]
        with torch.no_grad():
            self.ema = [p.detach().clone() for p in self.params]   # a DTensor clone keeps its sharding
        self.ema_decay, self.ema_warmup = float(ema_decay), ema_warmup
        self.current_mode = "student"

    @property
    def sharded(self) -> bool:
        return any(_is_dtensor(p) for p in self.params)

    # the (student, teacher) pair the objectives take; it needs only mode(), which this class has too
    predictors = lora.LoRANetwork.predictors

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.params

    def ema_decay_at(self, step: int) -> float:
        return lora.ema_decay_at(self.ema_decay, self.ema_warmup, step)

    @torch.no_grad()
    def ema_update(self, step: int = 0):
        decay = self.ema_decay_at(step)
        for e, p in zip(self.ema, self.params):
            e.lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def _swap(self):
        # FSDP2 keeps the root's gathered weights after a forward; drop every gathered copy so the next
        # forward all-gathers the shards we are about to swap
        for m in self.model.modules():
            if m.__class__.__name__.startswith("FSDP") and callable(getattr(m, "reshard", None)):
                m.reshard()
        for e, p in zip(self.ema, self.params):
            a, b = (p.to_local(), e.to_local()) if _is_dtensor(p) else (p.data, e)
            tmp = a.clone()
            a.copy_(b)
            b.copy_(tmp)

    @contextlib.contextmanager
    def mode(self, mode: str):
        """'teacher': forward passes use the EMA weights (swapped in, and back on exit)."""
        if mode not in MODES:
            raise ValueError(f"full fine-tuning has modes {MODES}, got {mode!r}")
        if mode == "student" or self.current_mode == "teacher":
            yield self
            return
        self._swap()
        self.current_mode = "teacher"
        try:
            yield self
        finally:
            self.current_mode = "student"
            self._swap()

    # -- checkpoints: full tensors, any world size ------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Full weights and EMA (collective when sharded: call on every rank)."""
        sd = {}
        for n, p, e in zip(self.param_names, self.params, self.ema):
            sd["weight." + n] = _full(p)
            sd["ema." + n] = _full(e)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, torch.Tensor]):
        missing = [n for n in self.param_names if "weight." + n not in sd]
        if missing:
            raise ValueError(f"checkpoint lacks weights {missing[:3]}: it was made for another model or LoRA run")
        for n, p, e in zip(self.param_names, self.params, self.ema):
            _assign(p, sd["weight." + n])
            _assign(e, sd["ema." + n])

    def full_optimizer_state(self, optimizer) -> dict:
        """The optimizer's state with every tensor full (collective when sharded)."""
        state = optimizer.state_dict()
        state["state"] = {k: {name: (_full(v) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
                              for name, v in s.items()} for k, s in state["state"].items()}
        return state

    @torch.no_grad()
    def load_full_optimizer_state(self, optimizer, state: dict):
        """Load a full optimizer state, each rank keeping its own shard (built from its parameters)."""
        optimizer.load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        for index, p in enumerate(self.params):
            saved = state["state"].get(index, state["state"].get(str(index)))
            if saved is None:
                continue
            own = {}
            for name, v in saved.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    target = torch.zeros_like(p)
                    _assign(target, v)
                    own[name] = target
                else:
                    own[name] = v.clone() if isinstance(v, torch.Tensor) else v
            optimizer.state[p] = own
