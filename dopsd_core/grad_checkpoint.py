"""Gradient checkpointing for chosen blocks: recompute their activations in backward to save memory.

Blocks' `forward` is wrapped on the instance (restored by `remove()`), the way ComfyUI's own trainer
does it. The LoRA mode active at forward time is re-entered during recomputation, so a block recomputed
in backward uses the same (student) adapter that produced the saved graph.
"""
import contextlib
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointHandle:
    def __init__(self, modules):
        self.modules = list(modules)

    def remove(self):
        for m in self.modules:
            m.__dict__.pop("forward", None)
        self.modules = []


def wrap_forwards(modules: Iterable[nn.Module], around) -> CheckpointHandle:
    """Run each module's forward as `around(original_forward, *args, **kwargs)` while autograd records;
    under no_grad the original forward runs untouched. `remove()` on the handle restores the modules."""
    wrapped = []
    for module in modules:
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return around(_original, *args, **kwargs)

        module.forward = forward
        wrapped.append(module)
    return CheckpointHandle(wrapped)


def checkpoint_modules(modules: Iterable[nn.Module], lora_network=None) -> CheckpointHandle:
    def around(original, *args, **kwargs):
        mode = lora_network.current_mode if lora_network is not None else None

        def run(*a, **k):
            # Blocks may update their inputs in place (ComfyUI's Flux blocks do); the checkpoint keeps
            # those inputs for recomputation, so the block gets its own copies.
            a = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)
            k = {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in k.items()}
            ctx = lora_network.mode(mode) if mode is not None else contextlib.nullcontext()
            with ctx:
                return original(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrap_forwards(modules, around)
