"""Same-bucket batches of training pairs: several pairs run through ComfyUI's guider as one batched call.

A batch stacks the pairs' target latents ([1, C, H, W] each -> [B, C, H, W]) and their conditionings entry by
entry along dim 0: the cross-attention tensors, and every tensor (or list of tensors, e.g. FLUX.2's
`reference_latents`) in the entries' option dicts. ComfyUI's conds then see a batch-B conditioning for a batch-B
latent (repeat_to_batch_size leaves it as is). Pairs stack when they have the same layout: latent shape,
conditioning lengths (tokens) and option keys and shapes; `bucket_key` is that layout, so the trainer's batch
order (dopsd_core.data.BatchOrder) only ever batches pairs that stack. Non-tensor options (e.g. a pooled
output of None, a guidance value) must be equal across the batch.
"""
from typing import List

import torch

BATCH_FIX = ("use batch_size 1 (with grad_accum for a larger effective batch), or give these pairs the same "
             "conditioning options (same teacher node and settings)")


def _layout(value):
    """A hashable description of a conditioning value's shape, without its batch dimension."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]), str(value.dtype))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _layout(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_layout(v) for v in value))
    return ("value", repr(value))


def bucket_key(pair) -> tuple:
    """Pairs with equal keys stack into one batch: latent shape, student and teacher conditioning layouts."""
    return (tuple(pair.latent.shape[1:]), _layout(pair.student), _layout(pair.teacher))


def _stack(values, where: str):
    first = values[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(v, torch.Tensor) or v.shape[1:] != first.shape[1:] for v in values):
            raise ValueError(f"{where}: tensors of shapes {[tuple(v.shape) for v in values]} cannot be batched")
        return torch.cat(values, dim=0)
    if isinstance(first, dict):
        keys = set(first)
        if any(not isinstance(v, dict) or set(v) != keys for v in values):
            raise ValueError(f"{where}: the conditionings carry different options "
                             f"{sorted(set().union(*[set(v) for v in values]) - keys) or sorted(keys)}")
        return {k: _stack([v[k] for v in values], f"{where}.{k}") for k in first}
    if isinstance(first, (list, tuple)):
        if any(not isinstance(v, (list, tuple)) or len(v) != len(first) for v in values):
            raise ValueError(f"{where}: lists of different lengths cannot be batched")
        stacked = [_stack([v[i] for v in values], f"{where}[{i}]") for i in range(len(first))]
        return type(first)(stacked) if isinstance(first, tuple) else stacked
    if any(v != first for v in values):
        raise ValueError(f"{where}: the values {values} differ")
    return first


def stack_conditioning(conds: List[list], what: str) -> list:
    """CONDITIONING of B pairs (each [[tensor [1, T, D], options], ...]) -> one of batch B, or ValueError."""
    return _stack(conds, what)


def stack_pairs(pairs: list):
    """One Pair whose latent, student and teacher are the pairs' stacked along dim 0 (a single pair as is)."""
    if len(pairs) == 1:
        return pairs[0]
    from ..pairs import Pair

    try:
        student = stack_conditioning([p.student for p in pairs], "student conditioning")
        teacher = stack_conditioning([p.teacher for p in pairs], "teacher conditioning")
        latent = _stack([p.latent for p in pairs], "latent")
    except ValueError as e:
        raise ValueError(f"pairs {[p.caption for p in pairs]} cannot share a batch: {e}. {BATCH_FIX}") from None
    return Pair(" | ".join(p.caption for p in pairs), student, teacher, latent,
                torch.cat([p.image for p in pairs], dim=0) if all(p.image is not None for p in pairs) else None)


def check_batchable(pairs: list, batch_size: int) -> List[int]:
    """Before a job starts: the bucket sizes (largest first). ValueError naming the fix when batch_size > 1 would
    batch nothing (no two pairs share a bucket, e.g. captions of different token lengths) or a bucket's pairs
    do not stack."""
    buckets = {}
    for p in pairs:
        buckets.setdefault(bucket_key(p), []).append(p)
    sizes = sorted((len(m) for m in buckets.values()), reverse=True)
    if batch_size <= 1:
        return sizes
    if sizes[0] < 2:
        raise ValueError(f"batch_size {batch_size} would batch nothing: no two of the {len(pairs)} pairs have the same "
                         "latent size and conditioning length (captions that tokenize to different lengths, or "
                         "images of different sizes, cannot share a batch). Use batch_size 1 with grad_accum "
                         f"{batch_size} for the same effective batch")
    for members in buckets.values():
        if len(members) > 1:
            stack_pairs(members[:batch_size])
    return sizes
