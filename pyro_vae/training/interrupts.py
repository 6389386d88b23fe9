"""Ctrl-C during training: finish the current step, save, and stop with the command that resumes."""

from __future__ import annotations

import signal
import threading

from tqdm.auto import tqdm


class InterruptRequests:
    """While active, the first SIGINT only sets ``requested``, so the current step can finish and be saved.

    A second SIGINT interrupts at once, as usual. Outside the main thread
    (where Python cannot install signal handlers) it does nothing.
    """

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Interrupt: finishing the current step and saving (press Ctrl-C again to stop at once).")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
