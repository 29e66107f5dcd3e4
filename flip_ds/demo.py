"""The README's first command: every part of flip-ds on the built-in dataset, in minutes.

Builds the dataset and tokenizer (if absent), trains the tiny recipe under the deepspeed launcher
in the machine's layout (single-threaded ranks, one per core, on a CPU; one rank per GPU),
under the ZeRO stage and precision the machine needs (`auto`), with masking, then unmasked tuning;
exports the model, evaluates the exported file, and prints what was achieved. Each stage is a
real subcommand run as a user would run it; any failing stage stops the demo with its exit status.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flip_ds.config import Recipe, load_recipe
from flip_ds.data.config import default_workers
from flip_ds.data.synthetic import make_demo_dataset


def _run(stage: str, cmd: list[str]) -> None:
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    status = subprocess.run(cmd).returncode
    if status != 0:
        raise SystemExit(f"demo: stage '{stage}' failed with exit status {status}")


@dataclass(frozen=True)
class Layout:
    ranks: int
    device: str
    threads: int  # compute threads per rank
    reason: str


def choose_layout(recipe: Recipe) -> Layout:
    """Ranks x threads for this machine: one rank per GPU; on a CPU one single-threaded rank per
    core, as many as split the global batch and fit the host's memory by the planner (ZeRO stage
    auto's per-rank peak, each rank's share of the host as its budget).

    Single-threaded ranks because the threads of one process wait for each other at every operation,
    so one thread that another process holds off its core stalls them all, many times a step; ranks
    meet once a step, in DeepSpeed's gradient reduction. On a quiet host both layouts train the tiny
    model alike (docs/benchmarks.md, "Layout and ZeRO stage on CPU").
    """
    import torch

    from flip_ds.distributed import cpu_threads_per_rank
    from flip_ds.precision import resolve_precision
    from flip_ds.zero_auto import choose_stage, host_memory_bytes

    if torch.cuda.is_available():
        return Layout(torch.cuda.device_count(), "cuda", torch.get_num_threads(), "one rank per GPU")
    cores, g = os.cpu_count() or 1, recipe.train.global_batch
    precision = resolve_precision(recipe.train.precision, "cpu").name
    for ranks in sorted((n for n in range(1, cores + 1) if g % n == 0), reverse=True):
        split = dataclasses.replace(recipe, resume="none",
                                    train=dataclasses.replace(recipe.train, micro_batch=g // ranks))
        if ranks == 1 or choose_stage(split, "cpu", precision, ranks, ranks, host_memory_bytes() // ranks).fits:
            break
    reason = ("single-threaded ranks, one per core: threads of one process stall together when another process "
              "holds one of their cores, ranks meet once a step (docs/benchmarks.md)")
    if ranks < cores:
        reason += f"; {ranks} of {cores} cores: the most ranks that split the global batch {g} and fit host memory"
    return Layout(ranks, "cpu", cpu_threads_per_rank(ranks), reason)


def _phase_throughput(out: Path) -> dict[str, float]:
    """Median samples/s per phase, read back from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    mask = {e.step: e.value for e in acc.Scalars("train/mask_ratio")}
    by_mask: dict[float, list[float]] = {}
    for e in acc.Scalars("perf/samples_per_s")[1:]:  # the first window includes start-up
        by_mask.setdefault(round(mask[e.step], 3), []).append(e.value)
    return {f"{m:g}": statistics.median(v) for m, v in sorted(by_mask.items())}


def run_demo(recipe_path: str, data_dir: str, out_dir: str, train_samples: int) -> int:
    started = time.perf_counter()
    data, out = Path(data_dir), Path(out_dir)
    flip_ds = [sys.executable, "-m", "flip_ds"]
    print(f"=== built-in dataset in {data} (made once, then reused)", flush=True)
    demo = make_demo_dataset(str(data), train_samples=train_samples)
    recipe = load_recipe(recipe_path)
    layout = choose_layout(recipe)
    nproc, device = layout.ranks, layout.device
    micro = recipe.train.global_batch // nproc
    workers = recipe.data.workers if recipe.data.workers is not None else default_workers(nproc)
    print(f"=== layout: {nproc} x {device} with {layout.threads} thread(s) and {workers} data loader worker(s) "
          f"each: {layout.reason}", flush=True)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: the demo is repeatable
    overrides = [f"output_dir={out}", "resume=none", f"train.micro_batch={micro}",
                 f"data.train=[{{shards: '{demo.train}'}}]", f"data.tokenizer={demo.tokenizer}",
                 f"eval.sets.0.path={demo.zero_shot}", f"eval.sets.0.classnames={demo.classnames}",
                 f"eval.sets.0.templates={demo.templates}", f"eval.sets.1.path={demo.retrieval}"]
    # `deepspeed` is this module's console script; calling the module needs no PATH
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--module", "flip_ds"]
    train_start = time.perf_counter()
    _run(f"train ({nproc} x {device}, deepspeed launcher)", [*launcher, "train", "--config", recipe_path, *overrides])
    train_seconds = time.perf_counter() - train_start
    model = out / "model.safetensors"
    timm_file = out / "vision_timm.safetensors"
    _run("export", [*flip_ds, "export", str(out), "--out", str(model), "--timm-out", str(timm_file)])
    zs_json, rt_json = out / "eval_zero_shot.json", out / "eval_retrieval.json"
    _run("zero-shot eval (exported model)", [*flip_ds, "eval", "zero-shot", str(model), "--data", demo.zero_shot,
                                            "--classnames", demo.classnames, "--templates", demo.templates,
                                            "--json", str(zs_json), "--no-progress"])
    _run("retrieval eval (exported model)", [*flip_ds, "eval", "retrieval", str(model), "--data", demo.retrieval,
                                            "--json", str(rt_json), "--no-progress"])
    zero_shot = json.loads(zs_json.read_text())["metrics"]
    retrieval = json.loads(rt_json.read_text())["metrics"]
    speed = _phase_throughput(out)
    classes = len([p for p in Path(demo.zero_shot).iterdir() if p.is_dir()])
    masked, unmasked = speed.get(f"{recipe.phases[0].mask_ratio:g}"), speed.get("0")
    print("\n=== flip-ds demo: what it achieved")
    checkpointing = ", activation checkpointing" if recipe.model.activation_checkpointing else ""
    meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "meta.json")
                      .read_text())
    print(f"  trained        {recipe.model.name} FLIP, {recipe.total_samples} samples on {nproc} x {device} "
          f"(ZeRO-{meta['zero_stage']}, {meta['precision']}{checkpointing}) in {train_seconds:.0f} s")
    print(f"  layout         {nproc} process(es) x {layout.threads} thread(s), {workers} data loader worker(s) "
          f"each: {layout.reason}")
    print(f"  precision      {meta['precision']}: {meta['precision_reason']}")
    for mask, value in speed.items():
        print(f"  throughput     {value:.1f} samples/s at mask {mask} (median over the phase)")
    if masked and unmasked:
        print(f"  masking        {masked / unmasked:.2f}x samples/s at mask {recipe.phases[0].mask_ratio:g} vs 0, "
              "measured side by side in this run")
    print(f"  zero-shot      top-1 {100 * zero_shot['top1']:.1f}% (chance {100 / classes:.1f}%), "
          f"top-5 {100 * zero_shot['top5']:.1f}% on {classes} held-out classes")
    print(f"  retrieval      image->text R@1 {100 * retrieval['i2t_r1']:.1f}%, text->image R@1 "
          f"{100 * retrieval['t2i_r1']:.1f}%")
    print(f"  TensorBoard    tensorboard --logdir {out / 'tensorboard'}")
    print(f"  checkpoints    {out / 'checkpoints'} (resume with resume=auto)")
    print(f"  exported       {model} (flip_ds.load) and {timm_file} (timm)")
    print(f"  total time     {time.perf_counter() - started:.0f} s")
    return 0
