"""Benchmark rows: the arithmetic over measured medians (ratios, FLOP/s, MFU) and their tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flip_ds.models.config import ModelConfig
from flip_ds.models.flops import flops_per_sample
from flip_ds.models.text import kept_tokens


@dataclass
class Row:
    """One timed configuration. Throughput and FLOP/s are for all the processes doing the work."""

    stack: str  # 'flip-ds' or 'open_clip'
    setup: str  # 'zero1 bf16', 'amp_bf16', ...
    precision: str  # 'bf16' or 'fp32'
    mask: float
    batch_per_rank: int
    ranks: int  # processes stepping together (OpenCLIP: 1, with every thread of the node)
    step_s: float  # median seconds per optimizer step
    step_s_samples: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    tflops: float = 0.0  # model FLOPs (3x forward, kept tokens only) per second
    mfu: float = 0.0  # tflops / the matmul peak of the same devices, measured in the same run
    ratio_to_mask0: float | None = None  # step time / the same setup's step time at mask 0
    flops_ratio: float | None = None  # what FLOPs predict for that ratio
    optimizer_share: float | None = None  # share of the step in engine.step() (flip-ds)
    held_gb: float | None = None  # per rank, held between steps (flip-ds engines)
    peak_gb: float | None = None  # per rank, held + the step's rise above it

    @property
    def ratio_over_flops(self) -> float | None:
        if self.ratio_to_mask0 is None or not self.flops_ratio:
            return None
        return self.ratio_to_mask0 / self.flops_ratio


def train_flops_ratio(cfg: ModelConfig, mask: float) -> float:
    """Training FLOPs per sample at `mask` over those at mask 0: image tokens kept, text unchanged."""
    return flops_per_sample(cfg, mask).train / flops_per_sample(cfg, 0.0).train


def fill_throughput(row: Row, cfg: ModelConfig, peak_tflops: float) -> None:
    """samples/s, TFLOP/s and MFU of `row` from its step time; `peak_tflops` is the matmul peak of
    all the devices (or cores) that did the work."""
    row.samples_per_s = row.batch_per_rank * row.ranks / row.step_s
    row.tflops = flops_per_sample(cfg, row.mask).train * row.samples_per_s / 1e12
    row.mfu = row.tflops / peak_tflops


def fill_mask_ratios(rows: list[Row], cfg: ModelConfig) -> None:
    """Each row's step time relative to the same stack and setup at mask 0, next to the FLOPs' ratio."""
    unmasked = {(r.stack, r.setup, r.batch_per_rank): r.step_s for r in rows if r.mask == 0.0}
    for row in rows:
        base = unmasked.get((row.stack, row.setup, row.batch_per_rank))
        if base is not None:
            row.ratio_to_mask0 = row.step_s / base
            row.flops_ratio = train_flops_ratio(cfg, row.mask)


def peer_summary(rows: list[Row]) -> list[dict]:
    """Per mask: flip-ds's fastest setup against OpenCLIP's fastest precision, in samples/s."""
    summary = []
    for mask in sorted({r.mask for r in rows}):
        best = {}
        for stack in ("flip-ds", "open_clip"):
            candidates = [r for r in rows if r.stack == stack and r.mask == mask]
            if candidates:
                best[stack] = max(candidates, key=lambda r: r.samples_per_s)
        if len(best) == 2:
            ours, theirs = best["flip-ds"], best["open_clip"]
            summary.append({"mask": mask, "flip_ds": ours.setup, "flip_ds_ranks": ours.ranks,
                            "flip_ds_samples_per_s": ours.samples_per_s, "open_clip": theirs.setup,
                            "open_clip_samples_per_s": theirs.samples_per_s,
                            "speedup": ours.samples_per_s / theirs.samples_per_s})
    return summary


def largest_batch(measure: Callable[[int], int], budget: int, start: int) -> int:
    """The largest batch b with measure(b) <= budget (0 if none), for a measure that grows with b.

    Activation memory is affine in the batch, so two measurements predict the answer and two more
    confirm it; when the prediction misses (rounding, a flat stretch), a bracketing doubling and a
    bisection finish the search, so each measurement (a forward pass or a step) is spent sparingly.
    """
    fits_below, fails_at = 0, None  # largest batch known to fit, smallest known not to
    cache: dict[int, int] = {}

    def probe(b: int) -> int:
        nonlocal fits_below, fails_at
        if b not in cache:
            cache[b] = measure(b)
        if cache[b] <= budget:
            fits_below = max(fits_below, b)
        elif fails_at is None or b < fails_at:
            fails_at = b
        return cache[b]

    slope = (probe(2 * start) - probe(start)) / start
    if slope > 0:
        guess = int((budget - (cache[start] - slope * start)) // slope)
        guess = min(max(guess, 1), 64 * start)  # a wild prediction must not cost a huge measurement
        probe(guess)
        probe(guess + 1)
    while fails_at is None:
        probe(max(2 * fits_below, 1))
    while fails_at - fits_below > 1:
        probe((fits_below + fails_at) // 2)
    return fits_below


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[Row]) -> str:
    w = max([11] + [len(r.setup) for r in rows])
    head = (f"{'stack':<9} {'setup':<{w}} {'mask':>4} {'batch':>5} {'ranks':>5} {'step s':>7} {'samples/s':>9} "
            f"{'vs mask0':>8} {'FLOPs':>6} {'/FLOPs':>6} {'TFLOP/s':>8} {'MFU':>6} {'opt %':>5} {'held GB':>7} "
            f"{'peak GB':>7}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.stack:<9} {r.setup:<{w}} {r.mask:>4g} {r.batch_per_rank:>5} {r.ranks:>5} {r.step_s:>7.3f} "
            f"{r.samples_per_s:>9.2f} {_fmt(r.ratio_to_mask0, '8.3f'):>8} {_fmt(r.flops_ratio, '6.3f'):>6} "
            f"{_fmt(r.ratio_over_flops, '6.2f'):>6} {r.tflops:>8.4f} {100 * r.mfu:>5.1f}% "
            f"{_fmt(None if r.optimizer_share is None else 100 * r.optimizer_share, '5.0f'):>5} "
            f"{_fmt(r.held_gb, '7.2f'):>7} {_fmt(r.peak_gb, '7.2f'):>7}")
    return "\n".join(lines)


def format_peer(summary: list[dict]) -> str:
    lines = [f"{'mask':>4} {'flip-ds (ranks)':<20} {'samples/s':>9}   {'open_clip':<10} {'samples/s':>9} "
             f"{'speedup':>7}"]
    for s in summary:
        ours = f"{s['flip_ds']} ({s['flip_ds_ranks']})"
        lines.append(f"{s['mask']:>4g} {ours:<20} {s['flip_ds_samples_per_s']:>9.2f}   {s['open_clip']:<10} "
                     f"{s['open_clip_samples_per_s']:>9.2f} {s['speedup']:>6.2f}x")
    return "\n".join(lines)


def format_max_batch(entries: list[dict]) -> str:
    lines = [f"{'mask':>4} {'largest batch':>13} {'x mask 0':>8} {'activations GB':>14} {'budget GB':>9}"]
    for e in entries:
        lines.append(f"{e['mask']:>4g} {e['batch']:>13} {e['batch_vs_mask0']:>8.2f} {e['activation_gb']:>14.3f} "
                     f"{e['budget_gb']:>9.3f}")
    return "\n".join(lines)


def text_tower_summary(timings: list[tuple[str, float, float]], context_length: int) -> list[dict]:
    """(precision, text mask, seconds) of the text tower alone as rows, each against the same
    precision at text mask 0 (when it was timed) and the token count's ratio."""
    unmasked = {p: s for p, m, s in timings if m == 0.0}
    rows = []
    for precision, mask, seconds in timings:
        tokens = kept_tokens(context_length, mask)
        base = unmasked.get(precision)
        rows.append({"precision": precision, "text_mask": mask, "tokens": tokens, "ms": 1e3 * seconds,
                     "vs_text_mask0": seconds / base if base else None, "tokens_ratio": tokens / context_length})
    return rows


def format_text_tower(rows: list[dict]) -> str:
    lines = [f"{'precision':<9} {'text mask':>9} {'tokens':>6} {'fwd+bwd ms':>10} {'vs mask0':>8} {'x tokens':>8}"]
    for r in rows:
        lines.append(f"{r['precision']:<9} {r['text_mask']:>9g} {r['tokens']:>6} {r['ms']:>10.2f} "
                     f"{_fmt(r['vs_text_mask0'], '8.3f'):>8} {r['tokens_ratio']:>8.3f}")
    return "\n".join(lines)
