"""Running a sweep's cells: one after another on this machine, or as one Slurm job array.

Locally each unfinished cell is `flip-ds train` on its recipe (one process, or torchrun's
`--nproc_per_node N`), its output shown and appended to the cell's train.log. A stop signal to the
sweep (SIGTERM, SIGUSR1) is passed to the running cell, which checkpoints and exits 75; the sweep
then exits 75 too, and running it again resumes that cell from its checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from flip_ds.sweep import PreparedCell
from flip_ds.train import EXIT_PREEMPTED

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def train_command(recipe_file: Path, nproc: int) -> list[str]:
    train = ["-m", "flip_ds", "train", "--config", str(recipe_file)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]


class _Forwarder:
    """Passes the sweep's stop signals on to the running cell."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in FORWARDED_SIGNALS}

    def _handle(self, signum: int, _frame) -> None:
        self.signum = self.signum or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _run_cell(cell: PreparedCell, nproc: int, forwarder: _Forwarder) -> int:
    command = train_command(cell.recipe_file, nproc)
    with open(cell.dir / "train.log", "a", encoding="utf-8", buffering=1) as log:  # line by line, as it comes
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        forwarder.child = child
        if forwarder.signum is not None:  # a stop that arrived between two cells
            child.send_signal(forwarder.signum)
        for line in child.stdout:
            sys.stdout.write(line)
            log.write(line)
        return child.wait()


def run_locally(cells: list[PreparedCell], nproc: int) -> int:
    """Train every unfinished cell in order. 0 when all are done, 75 when stopped by a signal
    (run again to resume), 1 when a cell failed (the others still ran)."""
    forwarder = _Forwarder()
    results: list[tuple[str, str, float]] = []
    try:
        for i, cell in enumerate(cells, 1):
            status = cell.status()
            if status == "done":
                print(f"[sweep] cell {i}/{len(cells)} '{cell.cell.name}': done, skipped", flush=True)
                results.append((cell.cell.name, "done before", 0.0))
                continue
            verb = "resuming" if status == "partial" else "training"
            print(f"[sweep] cell {i}/{len(cells)} '{cell.cell.name}': {verb} ({cell.total_samples} samples); "
                  f"log {cell.dir / 'train.log'}", flush=True)
            start = time.perf_counter()
            code = _run_cell(cell, nproc, forwarder)
            seconds = time.perf_counter() - start
            if code == EXIT_PREEMPTED or forwarder.signum is not None:
                results.append((cell.cell.name, f"stopped (exit {code})", seconds))
                _summary(results)
                print(f"[sweep] stopped by a signal in cell '{cell.cell.name}' (its checkpoint is saved); run the "
                      "same command again to resume", flush=True)
                return EXIT_PREEMPTED
            results.append((cell.cell.name, "trained" if code == 0 else f"failed (exit {code})", seconds))
    finally:
        forwarder.close()
    _summary(results)
    failed = [name for name, outcome, _ in results if outcome.startswith("failed")]
    if failed:
        print(f"[sweep] {len(failed)} cell(s) failed: {', '.join(failed)} (see their train.log); run again to retry",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _summary(results: list[tuple[str, str, float]]) -> None:
    width = max(len(name) for name, _, _ in results)
    print("[sweep] cells:", flush=True)
    for name, outcome, seconds in results:
        print(f"  {name:<{width}}  {outcome}" + (f" in {seconds:.0f} s" if seconds else ""), flush=True)
