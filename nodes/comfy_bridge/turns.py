"""Turn-taking between ComfyUI's prompt worker and background training jobs on shared models.

ComfyUI has no lock around model loading; a prompt that loads a clone of the model a job trains would
re-patch the very modules the job is using. So they take turns, at step granularity:
- the prompt worker holds the turn from the moment `PromptQueue.get` returns until it asks again: with a
  prompt (execution, task_done) and without one, since after an empty wait the worker handles `/free`
  (unload_models, free_memory) and collects garbage, which unloads the model a step may be using;
- a training step runs only while the worker does not hold or want the turn; the worker waits for the
  step in flight to finish before it executes its prompt.
The worker side is installed by wrapping the queue's `get` (the one call the worker loop makes between
prompts); a node that must wait for a job inside a prompt can hand the turn over with `worker_yield()`.

A prompt may wait here for the step in flight. If the user cancels it meanwhile, ComfyUI's executor would
clear that Cancel when the prompt starts; the wrapper keeps it for the prompt (interrupts.py).
"""
import contextlib
import threading

from . import interrupts


class ModelTurn:
    def __init__(self):
        self._cond = threading.Condition()
        self._worker_holds = False
        self._worker_wants = False
        self._steps_running = 0

    # -- prompt worker side --------------------------------------------------------------------------
    def worker_acquire(self):
        with self._cond:
            self._worker_wants = True
            self._cond.wait_for(lambda: self._steps_running == 0)
            self._worker_holds, self._worker_wants = True, False

    def worker_release(self):
        with self._cond:
            self._worker_holds = False
            self._cond.notify_all()

    @property
    def worker_holds(self) -> bool:
        return self._worker_holds

    @contextlib.contextmanager
    def worker_yield(self):
        """Let jobs train while the worker waits for something (it must not touch models meanwhile)."""
        held = self._worker_holds
        if held:
            self.worker_release()
        try:
            yield
        finally:
            if held:
                self.worker_acquire()

    # -- trainer side --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def trainer_step(self, timeout=None):
        """One step at a time, and never while a prompt runs."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: not (self._worker_holds or self._worker_wants) and self._steps_running == 0, timeout)
            if not ok:
                raise TimeoutError("timed out waiting for the prompt worker to release the model")
            self._steps_running += 1
        try:
            yield
        finally:
            with self._cond:
                self._steps_running -= 1
                self._cond.notify_all()


TURN = ModelTurn()
_installed_on = None


def install_on_queue(queue, turn: ModelTurn = TURN, currently_in_prompt: bool = True):
    """Wrap `queue.get` so the prompt worker takes turns with training jobs (idempotent).

    Called from inside a prompt (the trainer node), so the worker is marked as holding the turn now; it
    releases it when it next asks the queue for work.
    """
    global _installed_on
    if _installed_on is queue:
        return
    original_get = queue.get

    def get(*args, **kwargs):
        if turn.worker_holds:
            turn.worker_release()
        item = original_get(*args, **kwargs)
        if item is not None:
            interrupts.clear_stale()   # what the executor does first: a Cancel from before this prompt
        turn.worker_acquire()          # also without a prompt: the worker may unload models next (/free)
        if item is not None and interrupts.flag_is_set():
            interrupts.keep_for_next_prompt()   # the user cancelled this prompt while it waited for the step
        return item

    queue.get = get
    _installed_on = queue
    if currently_in_prompt and not turn.worker_holds:
        turn.worker_acquire()


def install_from_server(turn: ModelTurn = TURN) -> bool:
    """Install on the running server's prompt queue; False when there is no server (in-process use)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    queue = getattr(server, "prompt_queue", None)
    if queue is None:
        return False
    install_on_queue(queue, turn)
    return True
