"""Cooperative control of a running training loop from another thread (UI buttons, HTTP routes).

The loop only looks at these flags between optimizer steps, so a stop or pause never leaves a
half-applied update behind. Hosts with flags of their own (e.g. an interrupt button) pass them as
`should_stop` / `should_pause` callables, which are ORed with the events.
"""
import threading
from typing import Callable, Optional


class TrainControl:
    def __init__(self, should_stop: Optional[Callable[[], bool]] = None,
                 should_pause: Optional[Callable[[], bool]] = None):
        self._stop = threading.Event()
        self._running = threading.Event()   # set = not paused
        self._running.set()
        self.save_on_stop = True
        self.should_stop, self.should_pause = should_stop, should_pause

    def stop(self, save: bool = True):
        self.save_on_stop = save
        self._stop.set()
        self._running.set()  # a paused loop must wake up to notice the stop

    def pause(self):
        self._running.clear()

    def resume(self):
        self._running.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set() or bool(self.should_stop and self.should_stop())

    @property
    def paused(self) -> bool:
        if self.stop_requested:
            return False
        return not self._running.is_set() or bool(self.should_pause and self.should_pause())

    def wait_while_paused(self, poll_s: float = 0.1) -> bool:
        """Block while paused; returns True if the loop had to wait (so the host can re-establish state)."""
        waited = False
        while self.paused:
            waited = True
            if self._running.is_set():   # paused by the host's should_pause(): poll it
                self._stop.wait(poll_s)
            else:
                self._running.wait(poll_s)
        return waited
