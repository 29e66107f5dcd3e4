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

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
