"""Per-rank memory: what an engine keeps between steps, and how far a step rises above that.

On a GPU the caching allocator counts both. On a CPU nothing does, so the held state is the sum
of the distinct tensor storages alive in the process (the CPU twin of `memory_allocated`), and a
step's peak is the resident set's high-water mark, which Linux resets on request
(`/proc/self/clear_refs`, "5"), the CPU twin of `reset_peak_memory_stats`.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{PROC_STATUS} has no {field}")
    return int(match.group(1)) * 1024


def held_bytes(device: str) -> int:
    """Bytes of tensors alive now (storages shared by several views counted once)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): some modules' objects warn when their __class__ is read
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    storages.pop(0, None)  # empty tensors (ZeRO-3's released parameters) have no storage
    return sum(storages.values())


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        CLEAR_REFS.write_text("5")


def current_and_peak(device: str) -> tuple[int, int]:
    """(memory in use now, the peak since `reset_peak`): allocator bytes on a GPU, resident bytes on a CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return _status_bytes("VmRSS"), _status_bytes("VmHWM")
