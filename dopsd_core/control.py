"""Cooperative control of a running training loop from another thread (UI buttons, HTTP routes).

The loop only looks at these flags between optimizer steps, so a stop or pause never leaves a
half-applied update behind.
"""
import threading


class TrainControl:
    def __init__(self):
        self._stop = threading.Event()
        self._running = threading.Event()   # set = not paused
        self._running.set()
        self.save_on_stop = True

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
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self.stop_requested and not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.1) -> bool:
        """Block while paused (a stop wakes it); returns True if the loop had to wait."""
        waited = False
        while self.paused:
            waited = True
            self._running.wait(poll_s)
        return waited
