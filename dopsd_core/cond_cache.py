"""Encode each prompt, and each (prompt, image) pair, once: text encoders are the slow part of a step."""
import hashlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch


def image_key(image) -> str:
    """A content hash of an image tensor / PIL image / bytes, so equal images share one encoding."""
    if isinstance(image, torch.Tensor):
        data = image.detach().cpu().contiguous().numpy().tobytes() + str(tuple(image.shape)).encode()
    elif hasattr(image, "tobytes"):
        data = image.tobytes() + str(getattr(image, "size", "")).encode()
    else:
        data = bytes(image)
    return hashlib.sha256(data).hexdigest()


class ConditionCache:
    """Memoises encode(prompt, image) -> condition; `encode_calls` counts real encodes (for tests)."""

    def __init__(self, encode: Callable[[str, Optional[Any]], Any]):
        self.encode = encode
        self.store: Dict[Tuple[str, Optional[str]], Any] = {}
        self.encode_calls = 0

    def get(self, prompt: str, image=None):
        key = (prompt, None if image is None else image_key(image))
        if key not in self.store:
            self.encode_calls += 1
            self.store[key] = self.encode(prompt, image)
        return self.store[key]
