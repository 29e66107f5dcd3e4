"""Where a training step's milliseconds go under the real DeepSpeed engine, and what DeepSpeed's
own switches would save (docs/benchmarks.md, "Per-step overhead").

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tools/step_overhead.py --zero 3 --precision bf16
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 1 tools/step_overhead.py --zero 1 --masks 0 0.5

On `flip-ds bench`'s synthetic batch (its model, batch and vocabulary), two parts:
  variants: the shipped engine JSON (ds_configs/zeroN.json) against the same JSON with one switch
    changed, interleaved (A B A B ...), median ms per step over the rounds;
  breakdown: the shipped engine's step, each phase timed by wrapping the method that runs it
    (inclusive wall time on rank 0; a collective's time includes waiting for the slower rank; on a
    GPU a phase's time is the host's, kernels running on), and the collectives per step, counted
    where torch.distributed is called.
Every step here is a logging step: it computes DeepSpeed's gradient norm, which flip-ds's other
bf16 ZeRO-1/2 steps skip (the `compute_grad_norm false` variant is such a step).
The wrappers belong to this measurement; flip-ds itself replaces none of DeepSpeed's methods.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flip_ds import distributed
from flip_ds import step as step_module
from flip_ds.bench.cases import interleave, synchronize
from flip_ds.bench.random_batch import random_batch
from flip_ds.bench.runner import BenchSpec, machine_info
from flip_ds.config import BatchSplit, Recipe, TrainConfig
from flip_ds.data.tokenizer import EOS_ID, PAD_ID
from flip_ds.engine import initialize, set_lr
from flip_ds.metrics import Stopwatch
from flip_ds.models.attention import resolve_attention, use_attention
from flip_ds.models.flip import build_model
from flip_ds.precision import dtype_of

REPO = Path(__file__).resolve().parent.parent
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "barrier")
collective_calls: collections.Counter[str] = collections.Counter()


def count_collectives() -> None:
    """Count every torch.distributed collective by name. Installed before the process group exists,
    since DeepSpeed keeps its own reference to some of them from then on."""
    for name in COLLECTIVES:
        collective = getattr(dist, name)

        def counted(*args: Any, _name: str = name, _collective: Callable = collective, **kwargs: Any) -> Any:
            collective_calls[_name] += 1
            return _collective(*args, **kwargs)

        setattr(dist, name, counted)


def variants(stage: int, precision: str) -> dict[str, dict[str, Any]]:
    """The shipped JSON and one-switch changes to it, each a `zero_optimization` override."""
    out: dict[str, dict[str, Any]] = {"shipped": {}}
    if stage in (1, 2) and precision == "bf16":  # fp32 needs the norm to skip non-finite gradients
        out["compute_grad_norm false"] = {"compute_grad_norm": False}
    if stage == 3:
        out["persistence threshold 0"] = {"stage3_param_persistence_threshold": 0}
    return out


class Setup:
    """One engine (a JSON variant) with the bench's fixed batch, stepped through flip-ds's step."""

    def __init__(self, name: str, json_path: str, args: argparse.Namespace, rank: int, world: int,
                 device: str) -> None:
        self.name, self.rank, self.device = name, rank, device
        self.model_cfg = BenchSpec(model=args.model).model_config
        self.dtype = dtype_of(args.precision)
        recipe = Recipe(model=self.model_cfg, train=TrainConfig(global_batch=args.batch * world, micro_batch=args.batch,
                                                                precision=args.precision, deepspeed=json_path))
        torch.manual_seed(0)
        model = build_model(self.model_cfg, args.vocab_size, pad_id=PAD_ID, eos_id=EOS_ID)
        self.engine = initialize(model, recipe, BatchSplit(args.batch, 1), device, args.precision)
        set_lr(self.engine, 1e-5)
        self.batch = random_batch(args.batch, self.model_cfg.resolved_image_size, self.model_cfg.context_length,
                                  args.vocab_size, seed=rank, device=device, dtype=self.dtype)
        self.steps = 0

    def run(self, mask: float, steps: int) -> None:
        use_attention(self.engine.module, resolve_attention(self.model_cfg.attention, self.device, self.dtype,
                                                            self.model_cfg.image_tokens(mask)))
        for _ in range(steps):
            step_module.contrastive_step(self.engine, [self.batch], image_mask=mask, text_mask=0.0, seed=0,
                                         rank=self.rank, step=self.steps, device=self.device,
                                         stop_requested=False, watch=Stopwatch())
            self.steps += 1
        synchronize(self.device)


class Case:
    """A (setup, mask) pair as flip_ds.bench.cases.interleave runs it. Beside the wall time it keeps
    this process's CPU time per step, which other tenants of a loaded host disturb far less."""

    def __init__(self, setup: Setup, mask: float) -> None:
        self.setup, self.mask, self.name = setup, mask, f"{setup.name} | mask {mask:g}"
        self.cpu_s: list[float] = []

    def run_block(self, steps: int) -> float:
        distributed.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.setup.run(self.mask, steps)
        self.cpu_s.append((time.process_time() - cpu_start) / steps)
        return (time.perf_counter() - start) / steps


def phases(engine: Any, stage: int) -> list[tuple[str, Any, str]]:
    """(label, owner, method) of each timed phase; an indented label is part of the one above it."""
    opt = engine.optimizer
    common = [("forward: the towers", engine, "forward"),
              ("forward: contrastive loss (feature all-gathers)", step_module, "contrastive_loss"),
              ("flip-ds agreement: non-finite/stop/abort, 1 all-reduce", step_module, "agree"),
              ("backward", engine, "backward"),
              ("  gradient reduction (backward epilogue)", engine, "_backward_epilogue"),
              ("engine.step", engine, "step"),
              ("  grad norm", opt, "scaled_global_norm" if stage < 3 else "_get_norm_groups"),
              ("  AdamW (the wrapped optimizer's own step)", opt.optimizer, "step")]
    if stage < 3:
        import deepspeed.runtime.zero.stage_1_and_2 as zero12

        return [*common, ("  overflow scan (bf16 only)", opt, "check_overflow"),
                ("  all-gather of the updated partitions", zero12, "all_gather_dp_groups"),
                ("logit-scale fp32 refresh, 1 collective", step_module, "refresh_fp32_logit_scale")]
    coordinator = opt.parameter_offload.get_param_coordinator()
    return [*common, ("  release parameters before the update", opt, "_partition_all_parameters"),
            ("  fp32 gradients into place", opt, "_prepare_sub_group"),
            ("  fp32 -> low-precision weights", opt, "_reassign_or_swap_out_partitioned_parameters"),
            ("  re-gather persistent parameters (one all-gather each)", opt, "_post_step"),
            ("  ZeRO-3 parameter fetch (hooks in forward and backward)", coordinator, "fetch_sub_module"),
            ("  ZeRO-3 parameter release (hooks in forward and backward)", coordinator, "release_sub_module"),
            ("logit-scale fp32 refresh, 1 collective", step_module, "refresh_fp32_logit_scale")]


Breakdown = tuple[float, list[tuple[str, float, float]], dict[str, float]]


def breakdowns(setup: Setup, stage: int, masks: list[float], steps: int) -> list[Breakdown]:
    """Per mask: seconds per step in all, (phase, seconds per step, calls per step) for each phase
    and the rest, and the collectives per step."""
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    table = phases(setup.engine, stage)
    for label, owner, method in table:
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args: Any, _label: str = label, _original: Callable = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - start
                calls[_label] += 1

        setattr(owner, method, timed)
    out = []
    for mask in masks:
        setup.run(mask, 2)  # this mask's attention path, warm
        seconds.clear(), calls.clear()
        distributed.barrier()
        collective_calls.clear()
        start = time.perf_counter()
        setup.run(mask, steps)
        total = (time.perf_counter() - start) / steps
        rows = [(label, seconds[label] / steps, calls[label] / steps) for label, _, _ in table]
        rest = total - sum(sec for label, sec, _ in rows if not label.startswith(" "))
        out.append((total, [*rows, ("rest: Python between the phases, Stopwatch, masking noise", rest, 0.0)],
                    {k: v / steps for k, v in collective_calls.items()}))
    return out


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(native) or "no native bf16"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--model", default="tiny")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--batch", type=int, default=8, help="samples per rank (flip-ds bench's default)")
    p.add_argument("--vocab-size", type=int, default=49408, help="flip-ds bench's default")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved blocks per case")
    p.add_argument("--breakdown-steps", type=int, default=20)
    args = p.parse_args()

    count_collectives()
    denv = distributed.detect_dist_env()
    distributed.quiet_deepspeed(info_logs=False)
    device = distributed.init_distributed(denv)
    rank, world = denv.rank, denv.world_size
    load_before = os.getloadavg()[0]
    shipped = json.loads((REPO / f"ds_configs/zero{args.zero}.json").read_text())
    setups = []
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as workdir:  # read once, by deepspeed.initialize
        for name, change in variants(args.zero, args.precision).items():
            path = Path(workdir) / f"{len(setups)}.json"
            path.write_text(json.dumps({**shipped, "zero_optimization": {**shipped["zero_optimization"], **change}}))
            setups.append(Setup(name, str(path), args, rank, world, device))
    cases = [Case(setup, m) for m in args.masks for setup in setups]
    samples = interleave(cases, args.rounds, args.steps, warmup=2)
    results = breakdowns(setups[0], args.zero, args.masks, args.breakdown_steps)
    if rank == 0:
        info = machine_info(device, world)
        print(f"# {args.model}, ZeRO-{args.zero} {args.precision}, {world} rank(s) x {info['threads_per_rank']} "
              f"thread(s), batch {args.batch} per rank; {info['device']}"
              + (f" ({cpu_flags()})" if device == "cpu" else "") + f"; torch {info['torch']}, "
              f"DeepSpeed {info['deepspeed']}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        print(f"\n{'variant | mask':<40} {'ms/step':>8} {'vs shipped':>10} {'CPU ms':>7} {'vs shipped':>10}   "
              "rounds (wall ms)")
        for mask in args.masks:
            here = [c for c in cases if c.mask == mask]
            for c in here:
                wall, cpu = statistics.median(samples[c.name]), statistics.median(c.cpu_s)
                base_wall, base_cpu = statistics.median(samples[here[0].name]), statistics.median(here[0].cpu_s)
                print(f"{c.name:<40} {1e3 * wall:>8.1f} {wall / base_wall:>10.3f} {1e3 * cpu:>7.1f} "
                      f"{cpu / base_cpu:>10.3f}   " + " ".join(f"{1e3 * x:.0f}" for x in samples[c.name]))
        for mask, (total, rows, counted) in zip(args.masks, results):
            print(f"\n# breakdown, shipped JSON, mask {mask:g}: {1e3 * total:.1f} ms/step; collectives per step: "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(counted.items())))
            for label, sec, n in rows:
                print(f"{label:<60} {1e3 * sec:>8.2f} ms {n:>6g} calls")
    for setup in setups:
        setup.engine.destroy()
    distributed.shutdown()


if __name__ == "__main__":
    main()
