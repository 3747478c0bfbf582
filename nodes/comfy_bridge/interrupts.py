"""ComfyUI's Cancel belongs to the user's prompt, never to a training job.

ComfyUI keeps one global interrupt flag (`comfy.model_management.interrupt_processing`). `/interrupt` sets
it; every comfy op (`comfy.ops.run_every_op`), the VAE and the progress hook call
`throw_exception_if_processing_interrupted()`, which raises `InterruptProcessingException` and clears the
flag. A job's thread runs those ops, so without care a Cancel meant for a prompt kills the job and is
consumed, and the prompt runs on. Two wrappers around the flag API fix that, identically in 0.3.75 and 0.33:

- `shielded()`: inside it (the job thread only; thread-local) the checks neither raise nor clear the
  flag, and `processing_interrupted()` reads False. Other threads see the flag exactly as before.
- `keep_for_next_prompt()`: a prompt waits for the training step in flight before it executes (turns.py);
  ComfyUI's executor clears the flag when it starts a prompt, which would drop a Cancel the user pressed
  for that prompt while it waited. Marked this way, the worker's next reset keeps the flag set, so the
  prompt's first node raises ComfyUI's own interruption.
"""
import threading

import comfy.model_management as mm

_local = threading.local()
_keep = threading.Event()
_installed = {}


def _shielded_now() -> bool:
    return getattr(_local, "depth", 0) > 0


def install():
    """Wrap ComfyUI's flag functions once (idempotent; wrappers defer to the originals outside the job)."""
    if _installed:
        return
    original_throw = mm.throw_exception_if_processing_interrupted
    original_read = mm.processing_interrupted
    original_set = mm.interrupt_current_processing

    def throw_exception_if_processing_interrupted():
        if _shielded_now():
            return
        return original_throw()

    def processing_interrupted():
        if _shielded_now():
            return False
        return original_read()

    def interrupt_current_processing(value=True):
        if not value and _keep.is_set() and not _shielded_now():
            _keep.clear()  # the reset at the start of the prompt the user cancelled while it waited
            return
        return original_set(value)

    _installed.update(throw=original_throw, read=original_read, set=original_set)
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.processing_interrupted = processing_interrupted
    mm.interrupt_current_processing = interrupt_current_processing


class shielded:
    """Context manager: ComfyUI's interrupt checks are inert in this thread (re-entrant)."""

    def __enter__(self):
        install()
        _local.depth = getattr(_local, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _local.depth -= 1
        return False


def flag_is_set() -> bool:
    """The global flag as ComfyUI's prompt worker sees it (read only, never cleared)."""
    install()
    return _installed["read"]()


def clear_stale():
    """Drop a Cancel pressed while no prompt ran (what ComfyUI's executor does when a prompt starts)."""
    install()
    _keep.clear()
    _installed["set"](False)


def keep_for_next_prompt():
    """The flag was set while the next prompt waited for the model turn: let that prompt see it."""
    install()
    _keep.set()
