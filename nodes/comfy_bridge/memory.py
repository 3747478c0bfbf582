"""What a training step needs from ComfyUI's memory manager, asked for the way its samplers ask.

ComfyUI's samplers call `load_models_gpu([model], memory_required=..., minimum_memory_required=...)` with
the model's own inference estimate (`BaseModel.memory_required`), so the manager unloads other models
(text encoders, VAEs, other checkpoints) until the working memory fits. A training step needs more than a
sampling step: activations kept for backward and the LoRA's optimizer state. Without asking for it,
ComfyUI keeps e.g. the text encoder loaded and the step runs out of memory on a 24 GB card.

The figure is analytic (bytes), computed from the model's config and the example's shapes:
- inference: ComfyUI's own `memory_required` for the batch (attention and MLP peaks of one forward);
- activations: one [tokens, hidden] tensor per top-level block input with gradient checkpointing (plus one
  block's full set while it is recomputed), or ACTIVATIONS_PER_BLOCK such tensors per block without;
- LoRA: every LoRA parameter in fp32 five times (weight, gradient, AdamW's two moments, the EMA teacher).
"""
import math

import comfy.model_management
import torch

from .blocks import top_level_blocks
from .families import hidden_width

# Hidden-sized tensors a DiT block saves for backward, counted from Z-Image's / Flux's blocks: input and
# two norm outputs, q, k, v, attention output, projection, MLP input, and the MLP's hidden (about 8 widths
# for a gated 8/3 MLP). Rough by design: the figure sizes an eviction, it is not an allocator.
ACTIVATIONS_PER_BLOCK = 16
LORA_COPIES = 5


def tokens(model, latent_shape, cond_tokens: int) -> int:
    """Sequence length of one example: latent patches plus conditioning tokens, times the batch."""
    unet = getattr(model.model.model_config, "unet_config", {}) or {}
    patch = int(unet.get("patch_size", 2) or 1)
    spatial = [math.ceil(s / patch) for s in latent_shape[2:]]
    return int(latent_shape[0]) * (math.prod(spatial) + int(cond_tokens))


def training_extra(model, net, latent_shape, cond_tokens: int, checkpointing: bool, precision: str) -> int:
    """Bytes a training step needs beyond ComfyUI's inference estimate."""
    act_bytes = 2 if precision == "bf16" else 4
    per_tensor = tokens(model, latent_shape, cond_tokens) * hidden_width(model) * act_bytes
    blocks = len(top_level_blocks(model))
    if checkpointing:
        activations = blocks * per_tensor + ACTIVATIONS_PER_BLOCK * per_tensor
    else:
        activations = blocks * ACTIVATIONS_PER_BLOCK * per_tensor
    lora = sum(p.numel() for p in net.trainable_parameters()) * 4 * LORA_COPIES
    return int(activations + lora)


def inference_estimate(model, latent_shape) -> int:
    """ComfyUI's own estimate for one forward of this batch (what its samplers pass as the minimum)."""
    return int(model.model.memory_required(list(latent_shape)))


def training_memory(model, net, latent_shape, cond_tokens: int, checkpointing: bool, precision: str) -> int:
    return inference_estimate(model, latent_shape) + training_extra(
        model, net, latent_shape, cond_tokens, checkpointing, precision)


def load_for_training(model, memory: int):
    """Load (and so inject the LoRA into) the job's patcher with room for `memory` bytes of working memory.

    Without autograd, as ComfyUI's executor (inference mode) always loads: loading writes weight patches (e.g. a
    few-step LoRA from LoraLoaderModelOnly) into the weights, and for fp8 weights ComfyUI's stochastic rounding
    uses out= ops that raise while autograd records."""
    with torch.no_grad():
        comfy.model_management.load_models_gpu([model], memory_required=memory, minimum_memory_required=memory)
