"""Attach a dopsd_core LoRANetwork to a ComfyUI ModelPatcher through the host's injection mechanism.

Forward hooks are added by a PatcherInjection, so ComfyUI itself decides when they exist: they are
injected when the patcher is loaded for sampling (load_models_gpu -> patch_model) and ejected when it is
unloaded, detached, or pushed out because another prompt loaded a clone of the same model. The modules
of the loaded model are never replaced or renamed and no base weight is written.

Weights that ComfyUI loaded inside the executor's torch.inference_mode are inference tensors, which
autograd refuses to save for backward (every frozen weight on the path to a LoRA gradient must be saved).
While injected, each such parameter/buffer is given a plain tensor that aliases the same storage
(zero-copy, bit-identical values), and the original tensor objects are put back on eject.

Weights that are plain tensors (a model built or loaded outside the executor: the torchrun launcher, a
benchmark, another node pack) come with requires_grad=True, and autograd would then compute and keep a
gradient for every base weight: a second copy of the model in memory, a third more backward work, and a
crash for fp8 weights (no fp8 add for the gradient sum). They are frozen while injected, as ComfyUI's own
trainer freezes its model, and their flag is put back on eject.
"""
from typing import Sequence

import comfy.patcher_extension
import torch

from ...dopsd_core.lora import LoRANetwork
from . import families

INJECTION_KEY = "dopsd_lora"

def default_targets(model) -> Sequence[str]:
    """The model family's "auto" LoRA targets (families.py; official for Z-Image, wider for klein)."""
    return families.default_targets(model)


def parse_targets(text: str, model) -> Sequence[str]:
    text = (text or "").strip()
    if text in ("", "auto"):
        return default_targets(model)
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def build_network(model, rank: int, alpha: float, targets_text: str, dropout: float, ema_decay: float,
                  ema_warmup: bool, seed: int, init: str = "default") -> LoRANetwork:
    net = LoRANetwork.for_module(model.model.diffusion_model, rank=rank, alpha=alpha,
                                 targets=parse_targets(targets_text, model), dropout=dropout, init=init,
                                 ema_decay=ema_decay, ema_warmup=ema_warmup, seed=seed, device="cpu")
    return net


def _plain_alias(t):
    """A non-inference tensor viewing the same memory as inference tensor `t`."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                              t.stride())


def _alias_inference_tensors(root):
    """Swap inference parameters/buffers for plain aliases; returns what to put back."""
    swapped = []
    with torch.inference_mode(False):
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = _plain_alias(tensor)
                    if isinstance(tensor, torch.nn.Parameter):
                        alias = torch.nn.Parameter(alias, requires_grad=False)
                    table[name] = alias
                    swapped.append((table, name, tensor, alias))
    return swapped


def _freeze_parameters(root):
    """requires_grad=False on every parameter of `root` that wants a gradient; returns those parameters."""
    frozen = [p for p in root.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _restore(swapped, frozen):
    for table, name, original, alias in swapped:
        if table.get(name) is alias:  # still ours: nobody replaced it meanwhile
            table[name] = original
    for p in frozen:
        p.requires_grad_(True)


class Attachment:
    """Where the job's LoRA is: `injected` now, and how many times ComfyUI ejected it (unload, another
    clone loaded). A step compares `ejections` before and after to know whether it ran without its LoRA."""

    def __init__(self):
        self.injected = False
        self.ejections = 0


def install(model, net: LoRANetwork) -> Attachment:
    """Register the injection on `model` (a clone owned by the training job)."""
    state = {"handle": None, "swapped": [], "frozen": []}
    attachment = Attachment()

    def inject(patcher):
        root = patcher.model.diffusion_model
        net.to(patcher.load_device)
        state["swapped"] = _alias_inference_tensors(root)
        state["frozen"] = _freeze_parameters(root)
        state["handle"] = net.attach(root)
        attachment.injected = True

    def eject(patcher):
        if state["handle"] is not None:
            state["handle"].remove()
            state["handle"] = None
        _restore(state["swapped"], state["frozen"])
        state["swapped"], state["frozen"] = [], []
        if attachment.injected:
            attachment.ejections += 1
        attachment.injected = False

    model.set_injections(INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject)])
    return attachment


def uninstall(model):
    """Eject now (if injected) and forget the injection."""
    model.eject_model()
    model.remove_injections(INJECTION_KEY)
