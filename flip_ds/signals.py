"""Stop requests from the scheduler: SIGTERM and SIGUSR1 (what SLURM sends before a time limit
or a preemption) set a flag; the train loop finishes its step, checkpoints and exits.

The handler only records the request, so a second signal during the save changes nothing. Once a
stop is requested, uninstalling leaves the stop signals ignored: the process is on its way out
with status 75, and SLURM keeps signalling it (the sbatch template repeats USR1 until the step
ends; SIGTERM may follow). A Python handler would not do, since interpreter shutdown puts the
default action (termination) back for signals that have one; an ignored signal stays ignored.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal this process received
        self.stopping = False  # the run stops on a request, this process's or another rank's
        self._previous = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers; when stopping on a request, ignore the stop signals instead."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.stopping or self.requested else handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is None:  # the first signal is the reason; later ones repeat it
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
