"""Interrupts that are never lost: SIGINT (Ctrl-C) and SIGTERM as a flag checked at safe points.

Python raises `KeyboardInterrupt` wherever the main thread happens to be when SIGINT arrives,
including inside a garbage-collection callback (JAX registers one), where the exception is
printed as "Exception ignored in: ..." and swallowed, and the work goes on. SIGTERM, what SLURM
and other schedulers send before they kill a job (SLURM: `--signal=TERM@<seconds>` or at the
time limit, then SIGKILL after `KillWait`), ends the process at once by default. Long loops
(training, dataset generation) instead set a flag on the first signal, finish the unit of work
in flight, save it, and raise themselves: `KeyboardInterrupt` for SIGINT, `Terminated` (a
`SystemExit` with status 143 = 128 + SIGTERM) for SIGTERM. A second signal stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(SystemExit):
    """The run received SIGTERM and stopped after saving its work (exit status 143, the
    shell's `128 + SIGTERM`, so a scheduler sees a terminated job). Catch it like any
    `SystemExit` to do more before exiting."""

    def __init__(self, message: str = "terminated by SIGTERM after saving the work in flight"):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InterruptGuard:
    """`with InterruptGuard(message) as guard: ... guard.check()` between units of work.

    Installs its handlers only in the main thread and only over Python's default handlers
    (SIGINT: `default_int_handler`; SIGTERM: `SIG_DFL`; a handler the user installed is left
    alone); restores them on exit.
    """

    def __init__(self, message: str):
        self.message = message
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for number, default in defaults.items():
            if signal.getsignal(number) is default:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            self._raise(signum)  # the second signal: stop now
        self.received = signum
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{self.message} [{name}]", file=sys.stderr, flush=True)

    @staticmethod
    def _raise(signum):
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt

    @property
    def interrupted(self) -> bool:
        """Whether SIGINT or SIGTERM arrived since entering."""
        return self.received is not None

    def check(self) -> None:
        """Raise `KeyboardInterrupt` (SIGINT) or `Terminated` (SIGTERM) if one arrived since
        entering."""
        if self.received is not None:
            self._raise(self.received)

    def __exit__(self, *exc_info) -> bool:
        for number, previous in self._previous.items():
            signal.signal(number, previous)  # pyright: ignore[reportArgumentType]
        return False
