"""The README's first command: every part of flip-ds on the built-in dataset, in minutes.

Builds the dataset and tokenizer (if absent), trains the tiny recipe under the deepspeed launcher
(ZeRO-3, the precision the hardware does fast, masking, activation checkpointing, then unmasked
tuning), exports the model,
evaluates the exported file, and prints what was achieved. Each stage is a real subcommand run as
a user would run it; any failing stage stops the demo with its exit status.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flip_ds.config import load_recipe
from flip_ds.data.synthetic import make_demo_dataset
from flip_ds.engine_config import load_engine_json


def _run(stage: str, cmd: list[str]) -> None:
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    status = subprocess.run(cmd).returncode
    if status != 0:
        raise SystemExit(f"demo: stage '{stage}' failed with exit status {status}")


def _devices() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "cuda"
    return 2, "cpu"


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
    nproc, device = _devices()
    recipe = load_recipe(recipe_path)
    micro = recipe.train.global_batch // nproc
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
    stage = load_engine_json(recipe.train.deepspeed).get("zero_optimization", {}).get("stage", 0)
    checkpointing = ", activation checkpointing" if recipe.model.activation_checkpointing else ""
    meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "meta.json")
                      .read_text())
    print(f"  trained        {recipe.model.name} FLIP, {recipe.total_samples} samples on {nproc} x {device} "
          f"(ZeRO-{stage}, {meta['precision']}{checkpointing}) in {train_seconds:.0f} s")
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
