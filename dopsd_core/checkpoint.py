"""Training checkpoints (everything needed for exact resume) written atomically.

A checkpoint is written to a temporary file in the target folder and moved into place with os.replace,
so a crash mid-write leaves the previous checkpoint intact and never a truncated file.
"""
import os
import tempfile

import torch


def atomic_write(path: str, write_fn, overwrite: bool = True):
    """Call write_fn(tmp_path), then move tmp_path to path in one step."""
    path = os.path.abspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} appeared while writing; not overwriting it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(path: str, trainer) -> str:
    state = trainer.state_dict()
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, trainer):
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainer.load_state_dict(state)
    return state
