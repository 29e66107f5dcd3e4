"""tools/gpu_smoke.sh, the one prepared GPU check: its --cpu mode runs every stage here (the same
commands a GPU run makes, at tiny size), and its stage runner skips, reports and exits as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from tests.distributed_helpers import REPO

STAGES = ["data", "train", "resume", "eval", "export", "zero_stages", "bench"]


def test_cpu_mode_passes_every_stage_and_writes_its_figures(tmp_path):
    run = subprocess.run(["tools/gpu_smoke.sh", "--cpu", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert report["first_failure"] is None and list(report["stages"]) == STAGES
    assert all(s["status"] == "PASS" for s in report["stages"].values()), report
    for stage in STAGES:
        assert f"[gpu_smoke] PASS {stage} (" in run.stdout
    s = report["stages"]
    assert s["train"]["precision"] in ("bf16", "fp32") and s["train"]["samples_per_s_median"] > 1
    assert s["resume"]["steps_compared"] >= 4 and s["resume"]["max_loss_difference"] <= 1e-5
    assert s["eval"]["zero_shot"]["top1"] == s["train"]["zero_shot_top1_in_training"]  # same weights, same set
    assert s["export"]["loaded_on"] == "cpu" and s["export"]["image_embedding"] == "(2, 128)"
    assert {s["zero_stages"][f"zero{z}_first_loss"] for z in (1, 2, 3)} == {s["train"]["loss_first"]}
    for mask in ("0", "0.5", "0.75"):  # `bench --smoke` on one CPU rank: MFU measured 0.8-9%
        assert 0.001 < s["bench"][f"mask_{mask}"]["mfu"] < 0.6, s["bench"]


def _load_smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "tools" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_stage_skips_what_needs_it_and_is_named(tmp_path, capsys):
    smoke = _load_smoke_module()
    runner = smoke.Smoke(tmp_path, smoke.CPU, "cpu")

    def fails():
        raise smoke.StageFailed("exit 1: train")

    first = runner.run([("data", lambda: {"n": 1}, ()), ("train", fails, ("data",)), ("eval", lambda: {}, ("train",)),
                        ("bench", lambda: {"mfu": 0.5}, ())])
    assert first == "train"
    assert [r["status"] for r in runner.results.values()] == ["PASS", "FAIL", "SKIP", "PASS"]
    out = capsys.readouterr().out
    assert "FAIL train" in out and "exit 1: train" in out and "SKIP eval" in out and "needs train" in out
