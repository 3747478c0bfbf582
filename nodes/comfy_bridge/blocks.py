"""Top-level transformer blocks of a ComfyUI diffusion model, and a guard for their in-place updates.

ComfyUI's Flux blocks update their input in place (`x += gate * out`), which is fine for inference but
breaks backward once LoRA makes that input require grad: the block's own LayerNorm saved it. While a job
trains without gradient checkpointing, activations a block saves for backward are saved as copies taken at
save time (weights, which have no grad_fn, are not copied), so later in-place updates cannot corrupt them.
With gradient checkpointing, blocks are recomputed in backward and need no copies.

Only blocks that may update in place pay for the copies: blocks from modules known to be out of place
(Z-Image / Lumina2: `x = x + gate * out`) run untouched, which saves about a third of their activation
memory; blocks of any other family (Flux, Flux2, Chroma, unknown ones) keep the guard, to be safe.
"""
import torch

from ...dopsd_core.grad_checkpoint import CheckpointHandle, checkpoint_modules, wrap_forwards
from . import families


def top_level_blocks(model):
    root = model.model.diffusion_model
    return [block for child in root.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def _pack(tensor):
    return tensor.clone() if tensor.grad_fn is not None else tensor


def _unpack(tensor):
    return tensor


def snapshot_saved_activations(modules) -> CheckpointHandle:
    def around(original, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return original(*args, **kwargs)

    return wrap_forwards(modules, around)


updates_in_place = families.updates_in_place  # the family rule (families.OUT_OF_PLACE_MODULES)


def guard_blocks(model, net, checkpointing: bool) -> CheckpointHandle:
    blocks = top_level_blocks(model)
    if checkpointing:
        return checkpoint_modules(blocks, lora_network=net)
    return snapshot_saved_activations([b for b in blocks if updates_in_place(b)])
