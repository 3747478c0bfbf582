"""Peak tensor memory of a piece of code, on any device, CPU included.

CUDA has `torch.cuda.max_memory_allocated`; the CPU allocator keeps no such statistics, and the
process's RSS mostly shows the weights and the malloc cache. `PeakTensorMemory` counts what CUDA's
counter counts: every tensor storage created while it is active (activations, tensors saved for
backward, gradients, temporaries; forward and backward, since the autograd engine carries the mode into
backward), each counted once when created and released when the storage is actually freed (a weakref
finalizer on the storage, which fires only when no tensor, view or saved variable holds it). Outputs that
alias an input (views, in-place ops) are not new memory and are not counted. Storages that existed
before entering (weights, LoRA factors, optimizer state) are not counted either, so the number is the
extra memory the measured code needs on top of the model.

Not counted: scratch buffers a kernel allocates and frees inside itself (e.g. a matmul workspace).
"""
import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """with PeakTensorMemory() as m: ...   then m.peak (bytes above entry), m.current (still alive)."""

    def __init__(self, device: str = None):
        super().__init__()
        self.device = device
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.allocated = 0  # total bytes ever created inside (a throughput-ish number)

    def _release(self, key: int):
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                inputs.add(t.untyped_storage()._cdata)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if self.device is not None and t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            key, n = storage._cdata, storage.nbytes()
            if n == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = n
            self.current += n
            self.allocated += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def peak_bytes(fn, device: str = None) -> int:
    """Peak extra tensor bytes while running fn()."""
    with PeakTensorMemory(device) as m:
        fn()
    return m.peak
