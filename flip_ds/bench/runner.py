"""`flip-ds bench`'s run: build the cases, interleave them, and turn the medians into rows."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from flip_ds import distributed
from flip_ds.bench.cases import interleave, median
from flip_ds.bench.flip_case import FlipEngine, FlipStepCase
from flip_ds.bench.peak import MatmulPeak
from flip_ds.bench.table import Row, fill_mask_ratios, fill_throughput, largest_batch, peer_summary, text_tower_summary
from flip_ds.bench.text_case import TextTowerCase, text_tower
from flip_ds.config_loader import UsageError, check_flag, from_dict
from flip_ds.distributed import detect_dist_env, init_distributed, max_over_ranks, quiet_deepspeed, shutdown
from flip_ds.log import setup_logging
from flip_ds.models.attention import ATTENTION_SETTINGS
from flip_ds.models.config import REGISTRY, ModelConfig
from flip_ds.precision import PRECISIONS, resolve_on_all_ranks

GiB = 2**30
log = logging.getLogger(__name__)


@dataclass
class BenchSpec:
    model: str = "B/16"  # a registry size, or the name of `shape`
    shape: dict[str, Any] | None = None  # a recipe's model section (--config), any shape; None: REGISTRY[model]
    batch: int = 8  # per rank
    masks: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.75])
    text_masks: list[float] = field(default_factory=lambda: [0.0, 0.5])  # the text tower alone; []: not timed
    precisions: list[str] = field(default_factory=lambda: ["auto"])  # auto: what the hardware does fast
    stages: list[int] = field(default_factory=lambda: [1])
    attention: list[str] = field(default_factory=lambda: ["auto"])  # flip-ds's paths; auto: the trainer's per mask
    steps: int = 2  # optimizer steps per timed block
    rounds: int = 3  # blocks per case, interleaved with the other cases
    warmup: int = 1  # unrecorded steps per case before the first round
    peer: bool = False  # OpenCLIP's trainer on the same architecture and batch
    peer_precisions: list[str] | None = None  # OpenCLIP's; None: the same as `precisions`
    max_batch: bool = False  # largest batch per mask under a memory budget
    memory_budget_gb: float | None = None  # per rank; None: what mask 0 needs at `batch`
    vocab_size: int = 49408  # OpenCLIP's; only the embedding table's size, no FLOPs
    context_length: int = 32  # FLIP's
    activation_checkpointing: bool = False  # neither stack recomputes by default; equal work

    def validate(self) -> None:
        check_flag(self.shape is not None or self.model in REGISTRY,
                   f"--model: '{self.model}' is not a model; choose one of {', '.join(REGISTRY)}, "
                   f"or give a recipe with a shape of its own (--config)")
        _ = self.model_config  # building it checks the shape: a bad one fails in one line naming the key
        check_flag(self.batch > 0, f"--batch: {self.batch} must be > 0")
        check_flag(bool(self.masks) and all(0.0 <= m < 1.0 for m in self.masks),
                   f"--masks: {self.masks} must be in [0, 1)")
        check_flag(all(0.0 <= m < 1.0 for m in self.text_masks), f"--text-masks: {self.text_masks} must be in [0, 1)")
        for name, values in (("--precision", self.precisions), ("--peer-precision", self.peer_precisions or ["auto"])):
            check_flag(bool(values) and all(p in PRECISIONS for p in values),
                       f"{name}: {values}: {', '.join(PRECISIONS)}")
        check_flag(all(s in (1, 2, 3) for s in self.stages), f"--zero: {self.stages}: ZeRO stages are 1, 2 or 3")
        check_flag(bool(self.attention) and all(a in ATTENTION_SETTINGS for a in self.attention),
                   f"--attention: {self.attention}: {', '.join(ATTENTION_SETTINGS)}")
        check_flag(self.steps >= 1 and self.rounds >= 1 and self.warmup >= 0,
              "--steps and --rounds must be >= 1, --warmup >= 0")
        check_flag(self.vocab_size > 4, f"--vocab-size: {self.vocab_size} must be > 4")
        check_flag(self.memory_budget_gb is None or self.memory_budget_gb > 0, "--memory-budget-gb must be > 0")
        if self.max_batch:
            check_flag(0.0 in self.masks,
                       "--max-batch needs mask 0 in --masks (the largest batches are compared to it)")
        if self.peer:
            try:
                import open_clip  # noqa: F401
                import open_clip_train  # noqa: F401
            except ImportError:
                raise UsageError("--peer needs OpenCLIP: pip install 'flip-ds[bench]' (open-clip-torch)") from None

    @property
    def model_config(self) -> ModelConfig:
        """The benchmarked model: `shape` (or the registry's `model`), with the flags' text length and
        checkpointing, which a recipe's model section does not override: they are the bench's settings."""
        section = self.shape if self.shape is not None else {"name": self.model}
        return from_dict(ModelConfig, {**section, "context_length": self.context_length,
                                       "activation_checkpointing": self.activation_checkpointing}, "model")


@dataclass
class BenchResult:
    machine: dict[str, Any]
    spec: BenchSpec
    peak_tflops_per_rank: dict[str, float]  # the matmul peak of one rank, per precision
    rows: list[Row]
    peer: list[dict[str, Any]]  # table.peer_summary
    max_batch: list[dict[str, Any]]
    text_tower: list[dict[str, Any]]  # per precision and text mask: the text tower's forward + backward

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "spec": dataclasses.asdict(self.spec),
                "peak_tflops_per_rank": self.peak_tflops_per_rank,
                "rows": [{**dataclasses.asdict(r), "ratio_over_flops": r.ratio_over_flops} for r in self.rows],
                "peer": self.peer, "max_batch": self.max_batch, "text_tower": self.text_tower}


def run_bench(spec: BenchSpec) -> BenchResult | None:
    """Measure `spec` on however many ranks the launcher started; rank 0 returns the result, the others None."""
    spec.validate()
    denv = detect_dist_env()
    setup_logging(denv.rank, denv.world_size, progress=sys.stderr)  # stdout holds the table
    quiet_deepspeed(info_logs=False)  # its per-engine INFO lines would bury the table
    device = init_distributed(denv)
    try:
        result = _measure(_resolved(spec, device), denv.world_size, denv.local_world_size, device)
    finally:
        shutdown()
    return result if denv.rank == 0 else None


def _resolved(spec: BenchSpec, device: str) -> BenchSpec:
    """`spec` with 'auto' precisions made concrete for this hardware (the same on every rank)."""

    def resolve(values: list[str]) -> list[str]:
        chosen = [resolve_on_all_ranks(p, device) for p in values]
        for requested, precision in zip(values, chosen):
            log.info(f"precision {requested} -> {precision.name} ({precision.reason})")
            if precision.warning:
                log.warning(precision.warning)
        return list(dict.fromkeys(p.name for p in chosen))

    return dataclasses.replace(spec, precisions=resolve(spec.precisions),
                               peer_precisions=resolve(spec.peer_precisions) if spec.peer_precisions else None)


def _node_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _measure(spec: BenchSpec, world: int, local_world: int, device: str) -> BenchResult:
    load_before = _load_average()
    cfg = spec.model_config
    peaks = {p: MatmulPeak(p, device) for p in dict.fromkeys(spec.precisions + (spec.peer_precisions or []))}
    engines = []
    for stage in spec.stages:
        for precision in spec.precisions:
            log.info(f"building {spec.model} under ZeRO-{stage} {precision}, batch {spec.batch} per rank x {world}")
            engines.append(FlipEngine(cfg, spec.vocab_size, stage=stage, precision=precision, batch=spec.batch,
                                      rank=distributed.rank(), world_size=world,
                                      device=device))
    flip_cases = [FlipStepCase(e, m, a) for e in engines for a in spec.attention for m in spec.masks]
    peer_cases = []
    if spec.peer:
        from flip_ds.bench.openclip_peer import OpenClipStepCase, OpenClipTrainer

        log.info(f"building OpenCLIP's {spec.model} twin on rank 0 with {_node_threads()} threads")
        trainer = OpenClipTrainer(cfg, spec.vocab_size, (engines[0].images, engines[0].tokens), device,
                                  threads=_node_threads() if device == "cpu" else torch.get_num_threads())
        peer_cases = [OpenClipStepCase(trainer, p, m) for p in spec.peer_precisions or spec.precisions
                      for m in spec.masks]
    text_cases = [TextTowerCase(text_tower(cfg, spec.vocab_size, p, device), engines[0].tokens, p, m, device)
                  for p in spec.precisions for m in spec.text_masks]
    cases = [*peaks.values(), *flip_cases, *peer_cases, *text_cases]
    log.info(f"{len(cases)} cases x {spec.rounds} rounds x {spec.steps} steps, interleaved")
    samples = interleave(cases, spec.rounds, spec.steps, spec.warmup, progress=log.info)
    peak_per_rank = {p: peak.tflops(median(samples[peak.name])) for p, peak in peaks.items()}
    # OpenCLIP runs as one process: on a CPU it has the whole node, on a GPU one device
    peer_devices = local_world if device == "cpu" else 1

    memory = max_over_ranks([e.held_bytes for e in engines] + [c.peak_rise for c in flip_cases])
    held = dict(zip([id(e) for e in engines], memory[:len(engines)]))
    rows = []
    for case, rise in zip(flip_cases, memory[len(engines):]):
        e = case.engine
        row = Row("flip-ds", case.setup, e.precision, case.mask, spec.batch, world, median(samples[case.name]),
                  samples[case.name], optimizer_share=case.optimizer_share, held_gb=held[id(e)] / GiB,
                  peak_gb=(held[id(e)] + rise) / GiB)
        fill_throughput(row, cfg, peak_per_rank[e.precision] * world)
        rows.append(row)
    for case in peer_cases:
        row = Row("open_clip", case.name.split()[1], case.precision, case.mask, spec.batch, 1,
                  median(samples[case.name]), samples[case.name])
        fill_throughput(row, cfg, peak_per_rank[case.precision] * peer_devices)
        rows.append(row)
    fill_mask_ratios(rows, cfg)

    max_batch = _largest_batches(spec, engines[0]) if spec.max_batch else []
    for e in engines:
        e.destroy()
    machine = {**machine_info(device, world), "load_average_before": load_before, "load_average_after": _load_average()}
    text = text_tower_summary([(c.precision, c.ratio, median(samples[c.name])) for c in text_cases],
                              cfg.context_length)
    return BenchResult(machine, spec, peak_per_rank, rows, peer_summary(rows), max_batch, text)


def _largest_batches(spec: BenchSpec, engine: FlipEngine) -> list[dict[str, Any]]:
    """The paper's "more pairs under the same memory": per mask, the largest per-rank batch whose
    step fits the budget (held state + activations), found with the engine of the first setup."""

    def activations(batch: int, mask: float) -> int:
        return int(max_over_ranks([engine.activation_bytes(batch, mask)])[0])  # every rank searches alike

    held = int(max_over_ranks([engine.held_bytes])[0])
    budget = (int(spec.memory_budget_gb * GiB) if spec.memory_budget_gb else held + activations(spec.batch, 0.0))
    if budget <= held:
        raise UsageError(f"--memory-budget-gb: {spec.memory_budget_gb} GB is below the engine's held state "
                          f"({held / GiB:.2f} GB per rank)")
    entries = []
    for mask in sorted(spec.masks):
        log.info(f"largest batch under {budget / GiB:.2f} GB per rank at mask {mask:g}")
        # the first two probes, a quarter and a half of --batch, stay under the budget: no
        # measurement far above what fits (a CPU host has nothing that stops an oversized step)
        batch = largest_batch(lambda b, m=mask: activations(b, m), budget - held, max(1, spec.batch // 4))
        entries.append({"mask": mask, "batch": batch, "activation_gb": activations(batch, mask) / GiB,
                        "held_gb": held / GiB, "budget_gb": budget / GiB, "setup": engine.label,
                        "measure": "step peak (max_memory_allocated)" if engine.device == "cuda"
                        else "bytes saved for backward"})
    unmasked = next(e["batch"] for e in entries if e["mask"] == 0.0)
    for e in entries:
        e["batch_vs_mask0"] = e["batch"] / unmasked
    return entries


def _load_average() -> float | None:
    """The host's 1-minute load average: other tenants' work shows here (on 2 cores, 2.0 is ours alone)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str, world: int) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "accelerator": device, "ranks": world, "node_threads": _node_threads(),
        "threads_per_rank": torch.get_num_threads(), "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": _version("deepspeed"),
        "timm": _version("timm"), "open_clip": _version("open_clip_torch"),
    }
