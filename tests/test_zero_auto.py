"""ZeRO stage "auto": the planner's lowest stage that fits the memory of a rank, decided by the
planner's own figures, logged at start, shown by `train --dry-run` and `flip-ds plan`, recorded in
each checkpoint and kept by a resume (real DeepSpeed runs on 2 CPU ranks over gloo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from flip_ds.checkpoint import build_from, read_checkpoint
from flip_ds.cli import main
from flip_ds.config import load_recipe
from flip_ds.config_loader import ConfigError, to_dict
from flip_ds.cost import Setting
from flip_ds.engine_config import load_engine_json
from flip_ds.plan import GIB, Cluster, plan, vocab_size_of
from flip_ds.zero_auto import PLANNER_VOCAB, choose_stage, saved_stage
from tests.distributed_helpers import REPO, torchrun
from tests.engine_helpers import write_json

AUTO = "train.deepspeed=ds_configs/zero_auto.json"
MiB = 2**20


def tiny(out: Path, *overrides: str):
    return load_recipe(str(REPO / "configs" / "tiny_cpu.yaml"), [AUTO, f"output_dir={out}", *overrides])


def planner_peak(recipe, stage: int, tmp: Path) -> float:
    """The planner's per-rank peak of `recipe` on 2 CPU ranks, bf16, pinned to `stage` (the same
    buckets as zero_auto.json, which leaves them at DeepSpeed's defaults)."""
    pinned = write_json(tmp / f"zero{stage}.json", {"zero_optimization": {"stage": stage}})
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, deepspeed=pinned))
    return plan(recipe, Cluster(gpus=2, gpu_mem_gib=1e3, gpus_per_node=2), Setting(),
                vocab_size_of(recipe, PLANNER_VOCAB), precision="bf16").peak_bytes


def test_the_tiny_model_gets_zero1_in_a_normal_budget(tmp_path):
    choice = choose_stage(tiny(tmp_path), "cpu", "bf16", world=2, local_ranks=2, memory_bytes=12 * GIB)
    assert (choice.stage, choice.fits) == (1, True)
    assert choice.reason.startswith("auto on cpu, bf16: ZeRO-1 fits, peak ")
    assert "within 12 GiB per rank" in choice.reason
    assert choice.message.startswith("ZeRO stage 1 (auto on cpu, bf16: ZeRO-1 fits")


def test_a_smaller_budget_moves_auto_up_the_stages_where_the_planners_peaks_say(tmp_path):
    recipe = tiny(tmp_path)
    peak = {stage: planner_peak(recipe, stage, tmp_path) for stage in (1, 2, 3)}
    assert peak[1] > peak[2] > peak[3]  # ZeRO-2 partitions the gradients, ZeRO-3 the weights and smaller buckets
    for budget, stage, fits in [(peak[1] + MiB, 1, True), ((peak[1] + peak[2]) / 2, 2, True),
                                ((peak[2] + peak[3]) / 2, 3, True), (peak[3] - MiB, 3, False)]:
        choice = choose_stage(recipe, "cpu", "bf16", 2, 2, int(budget))
        assert (choice.stage, choice.fits) == (stage, fits), (budget, choice)
        for lower in range(1, stage):  # the reason gives each stage it passed over with its peak
            assert f"ZeRO-{lower} needs {peak[lower] / GIB:.3g} GiB" in choice.reason
    assert choice.reason.startswith("auto on cpu, bf16: no stage fits") and "ZeRO-3, the smallest" in choice.reason


def test_plan_chooses_for_the_gpus_it_plans(capsys):
    """On 64 H100-80GB the H/14 recipe fits at ZeRO-1; on 40 GB cards no stage fits without
    activation checkpointing and the plan says so, at the smallest stage."""
    h14 = str(REPO / "configs" / "flip_h14_laion400m.yaml")
    assert main(["plan", h14, AUTO, "--gpus", "64", "--gpu-mem", "79.6"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-1, bf16" in out.splitlines()[0] and "ZeRO stage auto: ZeRO-1 fits, peak 55.8 GiB" in out
    recipe = load_recipe(h14, [AUTO])
    small = plan(recipe, Cluster(gpus=64, gpu_mem_gib=40), Setting(), 32000)
    assert (small.zero.stage, small.fits) == (3, False)
    assert small.zero_reason.startswith("no stage fits 40 GiB per rank")
    checkpointed = plan(load_recipe(h14, [AUTO, "model.activation_checkpointing=true"]),
                        Cluster(gpus=64, gpu_mem_gib=40), Setting(), 32000)
    assert (checkpointed.zero.stage, checkpointed.fits) == (1, True)


def test_train_dry_run_shows_the_stage_and_why(tmp_path, capsys):
    common = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run", "--world-size", "2",
              f"output_dir={tmp_path}"]
    assert main([*common, AUTO]) == 0
    out = capsys.readouterr().out
    assert "# ZeRO stage 1 (auto on cpu, " in out and ": ZeRO-1 fits, peak " in out, out  # bf16 or fp32: this CPU's
    assert main([*common, "train.deepspeed=ds_configs/zero3.json"]) == 0
    assert "# ZeRO stage 3 (ds_configs/zero3.json)" in capsys.readouterr().out


def test_auto_with_offload_is_refused_in_one_line(tmp_path):
    offload = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": "auto",
                                                                      "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="chooses among stages 1-3 without offload: name the stage"):
        load_engine_json(offload)


def _fake_checkpoint(root: Path, meta: dict, deepspeed: str) -> Path:
    tag_dir = root / "checkpoints" / "step_00000004"
    tag_dir.mkdir(parents=True)
    recipe = load_recipe(str(REPO / "configs" / "tiny_cpu.yaml"), [f"train.deepspeed={deepspeed}"])
    (tag_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
    (tag_dir / "meta.json").write_text(json.dumps(meta))
    (root / "checkpoints" / "latest").write_text("step_00000004")
    return tag_dir


def test_the_saved_stage_is_the_metas_or_for_older_checkpoints_the_recipes_json(tmp_path):
    recorded = _fake_checkpoint(tmp_path / "new", {"step": 4, "zero_stage": 3}, "ds_configs/zero_auto.json")
    assert saved_stage(recorded.parent, recorded.name) == 3
    older = _fake_checkpoint(tmp_path / "old", {"step": 4}, "ds_configs/zero2.json")
    assert saved_stage(older.parent, older.name) == 2
    # a run that resumes takes it, whatever its memory would choose
    choice = choose_stage(tiny(tmp_path / "new"), "cpu", "bf16", 2, 2, 12 * GIB)
    assert choice.stage == 3 and "the stage of the checkpoint this run resumes" in choice.reason


def train_args(demo, out: Path, *overrides: str, steps: tuple[int, int]) -> list[str]:
    g = 16
    return ["train", "--config", "configs/tiny_cpu.yaml", f"output_dir={out}", "resume=auto",
            f"data.train=[{{shards: '{demo.train}'}}]", f"data.tokenizer={demo.tokenizer}", "data.workers=1",
            "data.sample_shuffle=64", f"train.global_batch={g}", f"train.micro_batch={g // 2}",
            "train.precision=fp32", f"phases.0.samples={steps[0] * g}", f"phases.0.warmup_samples={g}",
            f"phases.1.samples={steps[1] * g}", "phases.1.warmup_samples=0", "checkpoint.every_samples=0",
            "logging.every_steps=1", "logging.masked_image_grid=false", "eval.sets=[]", *overrides]


def meta_of(out: Path) -> dict:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / tag / "meta.json").read_text())


def test_a_run_logs_its_choice_records_it_and_a_resume_keeps_the_stage_it_was_saved_under(demo_shards, tmp_path):
    fresh = tmp_path / "fresh"
    done = torchrun(train_args(demo_shards, fresh, AUTO, steps=(2, 1)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ZeRO stage 1 (auto on cpu, fp32: ZeRO-1 fits, peak " in done.stdout, done.stdout
    assert meta_of(fresh)["zero_stage"] == 1
    # a ZeRO-1 checkpoint reads back whole: zero_to_fp32 leaves out the fixed sin-cos table, which
    # checkpoint.py takes from the module state ZeRO-1 saves
    ckpt = read_checkpoint(fresh)
    build_from(ckpt)
    assert ckpt.state_dict["visual.pos_embed"].dtype == torch.float32
    # saved under ZeRO-3, then resumed under "auto", which alone would choose ZeRO-1
    out = tmp_path / "zero3"
    done = torchrun(train_args(demo_shards, out, "train.deepspeed=ds_configs/zero3.json", steps=(3, 1)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert meta_of(out)["zero_stage"] == 3
    done = torchrun(train_args(demo_shards, out, AUTO, steps=(3, 2)))
    assert done.returncode == 0, done.stdout + done.stderr
    checkpoint = out / "checkpoints" / "step_00000004"
    assert f"ZeRO stage 3 (auto: the stage of the checkpoint this run resumes, {checkpoint})" in done.stdout
    assert f"resumed from {checkpoint} at step 4" in done.stdout
    assert (meta_of(out)["step"], meta_of(out)["zero_stage"]) == (5, 3)
