"""Training checkpoints (everything needed for exact resume), written atomically and never over a stranger.

A checkpoint is written to a temporary file in the target folder and moved into place with os.replace,
so a crash mid-write leaves the previous checkpoint intact and never a truncated file. Each training run
has a `run_id`; a checkpoint only replaces a file that is a checkpoint of the same run, so a new run
pointed at an old folder stops with an error instead of silently destroying the old run's state.
"""
import glob
import os
import random
import re
import time
import uuid
from typing import List, Optional

import torch

FORMAT = "dopsd-train-state/1"
STEP_FILE = "dopsd-step{step:06d}.pt"
_STEP_RE = re.compile(r"dopsd-step(\d+)\.pt$")


TEMP_SUFFIX = ".dopsd-tmp"  # no model extension, so ComfyUI never lists a temp file in a model dropdown
STALE_TEMP_S = 3600.0


def remove_stale_temps(folder: str, max_age_s: float = STALE_TEMP_S):
    """Temp files that a crash left behind (ours, and the '.tmp-*' names of earlier versions)."""
    now = time.time()
    for name in os.listdir(folder):
        if name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.startswith(".tmp-")):
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path) and now - os.path.getmtime(path) > max_age_s:
                    os.remove(path)
            except OSError:
                pass


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn, overwrite: bool = True):
    """Call write_fn(tmp_path), then move tmp_path to path in one step. The temp file is hidden
    ('.<name>.<random>.dopsd-tmp'), and the file gets the user's normal mode (0666 less the umask) even when
    write_fn's library writes 0600 files (safetensors does)."""
    path = os.path.abspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} appeared while writing; not overwriting it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -- RNG state (exact resume) ------------------------------------------------------------------------
def capture_rng(generator: Optional[torch.Generator] = None) -> dict:
    """Every RNG a training step may draw from: the trainer's generator, torch CPU (dropout), CUDA,
    Python's `random` and NumPy's global state (as tensors/tuples, loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if generator is not None:
        state["generator"] = generator.get_state()
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None):
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if state.get("numpy") is not None:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _tuples(x):
    """random.setstate needs tuples; a serialiser may have turned them into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- files ----------------------------------------------------------------------------------------------
def read_info(path: str) -> dict:
    """format, run_id and step of a checkpoint file, read lazily (memory-mapped, tensors untouched).
    Raises ValueError if the file is not a D-OPSD training checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a D-OPSD training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a D-OPSD training checkpoint (format {FORMAT})")
    return {"format": state["format"], "run_id": state.get("run_id"), "step": int(state.get("step", 0))}


def save_checkpoint(path: str, trainer) -> str:
    """Write trainer.state_dict() to `path`. An existing file is replaced only if it is a checkpoint of
    the same run (same run_id); anything else raises FileExistsError."""
    state = trainer.state_dict()
    if os.path.exists(path):
        try:
            info = read_info(path)
        except ValueError:
            raise FileExistsError(f"{path} exists and is not a D-OPSD checkpoint; not overwriting it. "
                                  "Choose another file name") from None
        if info["run_id"] != state["run_id"]:
            raise FileExistsError(f"{path} holds a checkpoint of another training run (step {info['step']}); "
                                  "resume from it, or save this run somewhere else")
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, trainer) -> dict:
    """Restore `trainer` (LoRA, EMA, optimizer, schedule, data order, RNGs, step) from `path`,
    a checkpoint file or a folder of step-numbered checkpoints (the latest is used)."""
    if os.path.isdir(path):
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise FileNotFoundError(f"no D-OPSD checkpoint ({STEP_FILE.format(step=0)}...) in {path}")
        path = latest
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a D-OPSD training checkpoint (format {FORMAT})")
    trainer.load_state_dict(state)
    return state


class CheckpointManager:
    """Step-numbered checkpoints in one folder, keeping the newest `keep` (0 keeps all)."""

    def __init__(self, folder: str, keep: int = 3):
        self.folder, self.keep = folder, keep

    def path_for(self, step: int) -> str:
        return os.path.join(self.folder, STEP_FILE.format(step=step))

    def list(self) -> List[str]:
        """Checkpoint files, oldest step first."""
        found = []
        for p in glob.glob(os.path.join(glob.escape(self.folder), "dopsd-step*.pt")):
            m = _STEP_RE.search(os.path.basename(p))
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[str]:
        files = self.list()
        return files[-1] if files else None

    def check_owner(self, run_id: str):
        """Refuse a folder that holds another run's checkpoints (before training, not after an hour)."""
        latest = self.latest()
        if latest is not None and read_info(latest)["run_id"] != run_id:
            raise FileExistsError(f"{self.folder} holds checkpoints of another training run (latest: "
                                  f"{os.path.basename(latest)}); resume from it or choose an empty folder")

    def save(self, trainer) -> str:
        path = save_checkpoint(self.path_for(trainer.step), trainer)
        if self.keep > 0:
            for old in self.list()[:-self.keep]:
                if read_info(old)["run_id"] == trainer.run_id:
                    os.remove(old)
        return path
