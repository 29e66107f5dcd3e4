"""Stop requests from the scheduler: SIGTERM and SIGUSR1 (what SLURM sends before a time limit
or a preemption) set a flag; the train loop finishes its step, checkpoints and exits.

The handler only records the request, so a second signal during the save changes nothing.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
