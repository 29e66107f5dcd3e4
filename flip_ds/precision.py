"""Which precision a run computes in: the recipe's choice, or what the hardware does fast (`auto`).

bf16 halves memory and, on hardware with bf16 units, doubles matmul throughput or more. Without
them torch emulates it: on an AVX2-only CPU a bf16 matmul runs about 90x slower than fp32. So
`auto` is bf16 on GPUs that support it and on CPUs whose bf16 matmul is fast, fp32 elsewhere.
Whether a CPU's bf16 is fast is measured, not read from a table: the flags (AVX512-BF16, AMX)
say what the silicon has, but only a timing says whether this torch build uses it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp32")
# A CPU whose bf16 matmul takes up to this many times fp32's has native bf16 (measured: 0.1-0.5x
# with AVX512-BF16; 30-90x emulated on AVX2). The gap is wide, so load on the host cannot flip it.
NATIVE_BF16_MAX_SLOWDOWN = 2.0
_PROBE_SIZE = 256  # big enough to reach the BLAS kernel, small enough to cost milliseconds emulated


@dataclass(frozen=True)
class Precision:
    name: str  # 'bf16' or 'fp32'
    reason: str  # why, in words, for the start-up log, meta.json and TensorBoard
    warning: str | None = None  # set when the choice is known to be slow on this hardware

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.name)


def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 feature flags (x86: avx512_bf16, amx_bf16; ARM: bf16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return []
    return sorted(words & {"avx512_bf16", "amx_bf16", "bf16"})


def _seconds_per_matmul(dtype: torch.dtype) -> float:
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE).to(dtype)
    torch.mm(a, a)  # first call: kernel selection, allocation
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """This process's bf16 matmul time over its fp32 time on the CPU (once per process)."""
    return _seconds_per_matmul(torch.bfloat16) / _seconds_per_matmul(torch.float32)


def resolve_precision(requested: str, device: str, *, cuda_bf16: bool | None = None,
                      cpu_slowdown: float | None = None) -> Precision:
    """`requested` ('auto', 'bf16' or 'fp32') made concrete for `device` ('cuda' or 'cpu').

    `cuda_bf16` and `cpu_slowdown` describe the hardware; by default they are asked of torch
    (is_bf16_supported) and measured (cpu_bf16_slowdown). A distributed caller measures once and
    passes the slowest rank's figure, so every rank chooses alike.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if device == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if requested != "auto":
            return Precision(requested, f"{requested} as the recipe asks")
        if supported:
            return Precision("bf16", "auto: this GPU supports bf16")
        return Precision("fp32", "auto: this GPU has no bf16 support (pre-Ampere)")
    slowdown = cpu_bf16_slowdown() if cpu_slowdown is None else cpu_slowdown
    native = slowdown <= NATIVE_BF16_MAX_SLOWDOWN
    flags = ", ".join(cpu_bf16_flags()) or "none"
    measured = f"bf16 matmul measured at {slowdown:.2g}x fp32's time; CPU flags: {flags}"
    if requested == "auto":
        if native:
            return Precision("bf16", f"auto: this CPU computes bf16 natively ({measured})")
        return Precision("fp32", f"auto: this CPU emulates bf16 ({measured})")
    warning = None
    if requested == "bf16" and not native:
        warning = (f"bf16 on a CPU without native bf16: its matmuls are emulated, {slowdown:.0f}x slower than fp32 "
                   "here; precision 'auto' (or fp32) trains much faster")
    return Precision(requested, f"{requested} as asked ({measured})", warning)


def resolve_on_all_ranks(requested: str, device: str) -> Precision:
    """`resolve_precision` in a process group: on CPUs every rank measures and the slowest bf16
    decides, so all ranks compute in one precision (DeepSpeed needs that)."""
    if device != "cpu":
        return resolve_precision(requested, device)
    from flip_ds.distributed import max_over_ranks

    return resolve_precision(requested, device, cpu_slowdown=max_over_ranks([cpu_bf16_slowdown()])[0])
