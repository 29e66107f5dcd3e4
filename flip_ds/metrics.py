"""Training telemetry: TensorBoard scalars and images on rank 0, a console line, throughput and MFU."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per device, for MFU when the recipe states none (logging.peak_tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "MI300X": 1307.0, "MI250X": 383.0, "V100": 125.0}


def device_peak_tflops(device: str, stated: float | None) -> float | None:
    if stated is not None or device != "cuda":
        return stated
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS


class Stopwatch:
    """Accumulates wall time per named section between reports."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, section: str) -> None:
        now = time.perf_counter()
        self.totals[section] = self.totals.get(section, 0.0) + now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


# A batch is "dominated" when more than half of its rows share one caption. The contrastive loss asks
# each caption to pick out its own image among the batch's: rows with the same caption are the same
# target, so on such rows the loss can only sit at chance (ln of the batch) and teaches nothing about
# the images. Web captions are nearly all distinct, and a shuffled class-labelled set with C equally
# common classes puts about 1/C of a batch on its largest class; more than half happens by chance
# with two captions or fewer, and otherwise when samples arrive sorted (a class-per-folder tree
# written in class order): the case to catch.
DOMINATED_SHARE = 0.5
# Smaller batches share a caption by coincidence too often to mean anything (3 of 4 rows of a
# shuffled 5-class set: 14% of batches).
MIN_CHECKED_ROWS = 8
# Warn when more than this share of a logging window's batches is dominated: in a shuffled stream
# with 3 equally common captions, batches of 32 rows are dominated by chance 5% of the time (with
# 10 captions, 1 in 10^8); sorted input dominates nearly every batch.
WARN_DOMINATED_BATCHES = 0.1


class CaptionRepeats:
    """How much of each of a rank's batches is one caption, counted per logging window.

    `observe` compares the token rows of a batch already on the rank (a sort of B x context ids);
    `take` returns the window's counts, for the trainer to sum over ranks with the other data counts.
    """

    COUNTS = ("batches", "dominated", "top_rows", "rows")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.warned = False

    def observe(self, tokens: torch.Tensor) -> None:
        rows = tokens.shape[0]
        if rows < MIN_CHECKED_ROWS:
            return
        top = int(torch.unique(tokens, dim=0, return_counts=True)[1].max())
        self.counts["batches"] += 1
        self.counts["dominated"] += int(top > DOMINATED_SHARE * rows)
        self.counts["top_rows"] += top
        self.counts["rows"] += rows

    def take(self) -> list[float]:
        """The window's counts in COUNTS order; the window starts anew."""
        window = [float(self.counts[k]) for k in self.COUNTS]
        self.counts = dict.fromkeys(self.COUNTS, 0)
        return window

    @staticmethod
    def scalars(totals: list[float]) -> dict[str, float]:
        """TensorBoard scalars from the window's counts summed over ranks: the share of batches
        dominated by one caption, and the mean share of a batch's most common caption (1/B: all distinct)."""
        batches, dominated, top_rows, rows = totals
        if not batches:
            return {}
        return {"data/duplicate_dominated_batches": dominated / batches,
                "data/duplicate_caption_share": top_rows / rows}

    def warning(self, totals: list[float]) -> str | None:
        """One warning per run, the first window in which many batches were dominated by one caption."""
        batches, dominated, top_rows, rows = totals
        if self.warned or not batches or dominated / batches <= WARN_DOMINATED_BATCHES:
            return None
        self.warned = True
        return (f"in {dominated / batches:.0%} of the last {int(batches)} batches (all ranks) more than half the rows "
                f"share one caption (a batch's most common caption holds {top_rows / rows:.0%} of it on average): the "
                "contrastive loss cannot learn from such batches and stays near ln(batch). The shards are probably "
                "sorted by class or caption: write them with `flip-ds make-shards`, which shuffles, or raise "
                "data.shard_shuffle / data.sample_shuffle. TensorBoard: data/duplicate_dominated_batches; "
                "said once")


class TrainLogger:
    """Writes only on rank 0; every rank may call it."""

    def __init__(self, log_dir: Path, rank: int) -> None:
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], samples_seen: int) -> None:
        """TensorBoard's x axis is samples seen: comparable across batch sizes and resumes."""
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, samples_seen)

    def image(self, tag: str, image: torch.Tensor, samples_seen: int) -> None:
        if self.writer:
            self.writer.add_image(tag, image, samples_seen)

    def text(self, tag: str, text: str, samples_seen: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, samples_seen)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
