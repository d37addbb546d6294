"""Ctrl-C that is never lost: SIGINT as a flag checked at safe points.

Python raises `KeyboardInterrupt` wherever the main thread happens to be when SIGINT arrives,
including inside a garbage-collection callback (JAX registers one), where the exception is
printed as "Exception ignored in: ..." and swallowed, and the work goes on. Long loops
(training, dataset generation) instead set a flag on the first Ctrl-C, finish the unit of work
in flight, save it, and raise `KeyboardInterrupt` themselves; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class InterruptGuard:
    """`with InterruptGuard(message) as guard: ... guard.check()` between units of work.

    Installs its handler only in the main thread and only over Python's default handler (a
    handler the user installed is left alone); restores it on exit.
    """

    def __init__(self, message: str):
        self.message = message
        self.received = False
        self._previous = None

    def __enter__(self) -> InterruptGuard:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = True
        print(f"\n{self.message}", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise `KeyboardInterrupt` if Ctrl-C was pressed since entering."""
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, *exc_info) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
