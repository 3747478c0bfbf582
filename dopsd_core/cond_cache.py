"""Encode each prompt, and each (prompt, image) pair, once: text/VLM encoders are the slow part of a step.

The student condition c_s depends on the prompt only; the teacher condition c_t on the prompt and the
target image. Keys are the prompt and a content hash of the image, so the same picture loaded twice (or
a copy of it) shares one encoding, and a changed file on disk gets a new one.
"""
import hashlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch


def image_key(image) -> str:
    """Content hash of an image tensor / PIL image / bytes / file path."""
    h = hashlib.sha256()
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif hasattr(image, "tobytes"):
        h.update(f"{getattr(image, 'mode', '')}:{getattr(image, 'size', '')}".encode())
        h.update(image.tobytes())
    else:
        h.update(bytes(image))
    return h.hexdigest()


class ConditionCache:
    """Memoises encode(prompt, image) -> condition.

    `encode_calls` counts real encodes and `hits` the lookups served from memory (tests and logs use them).
    """

    def __init__(self, encode: Callable[[str, Optional[Any]], Any]):
        self.encode = encode
        self.store: Dict[Tuple[str, Optional[str]], Any] = {}
        self.encode_calls = 0
        self.hits = 0

    def key(self, prompt: str, image=None) -> Tuple[str, Optional[str]]:
        return (prompt, None if image is None else image_key(image))

    def get(self, prompt: str, image=None):
        key = self.key(prompt, image)
        if key in self.store:
            self.hits += 1
        else:
            self.encode_calls += 1
            self.store[key] = self.encode(prompt, image)
        return self.store[key]

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, key) -> bool:
        return key in self.store

    def clear(self):
        self.store.clear()
