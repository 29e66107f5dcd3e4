"""Timed cases and their interleaving: A B C A B C ..., summarised by medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from flip_ds.distributed import barrier


class Case(Protocol):
    name: str

    def run_block(self, steps: int) -> float:
        """Run `steps` units of work on every rank; return this rank's seconds per unit."""
        ...


def synchronize(device: str) -> None:
    """Wait for queued device work, so the host clock measures it (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, work: Callable[[], None], units: int) -> float:
    """Seconds per unit of `work` (which runs all `units`), started together on all ranks."""
    synchronize(device)
    barrier()
    start = time.perf_counter()
    work()
    synchronize(device)
    return (time.perf_counter() - start) / units


def interleave(cases: Sequence[Case], rounds: int, steps: int, warmup: int = 1,
               progress: Callable[[str], None] = lambda message: None) -> dict[str, list[float]]:
    """Each case's seconds per unit, one sample per round, the cases taking turns within a round.

    Every case first runs `warmup` unrecorded units (allocator, autotuning, lazy buffers), so the
    first round is no slower than the others.
    """
    if warmup:
        for case in cases:
            case.run_block(warmup)
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for r in range(rounds):
        for case in cases:
            samples[case.name].append(case.run_block(steps))
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {samples[c.name][-1]:.3g}s" for c in cases))
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
