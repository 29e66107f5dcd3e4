"""`flip-ds sweep` and `flip-ds report` on a miniature joint-scaling grid: 2 shapes (the registry's
tiny and a wider shape of our own) x 2 data sizes x 2 schedule lengths, tiny models trained for a
few dozen samples each on the built-in data. It runs here (killed mid-cell and resumed, re-run
and skipped) and as a job array on the local Slurm cluster; the grid file's own checks are tested
without training."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flip_ds.config_loader import ConfigError
from flip_ds.sweep import load_grid, prepare
from tests.distributed_helpers import REPO

G = 8  # global batch: one rank, one micro batch
WIDE = {"name": "tiny-wide", "image_size": 64, "embed_dim": 192,
        "vision": {"patch_size": 8, "width": 192, "depth": 4, "heads": 4},
        "text": {"width": 192, "depth": 4, "heads": 4}}


def write_grid(demo, out: Path, path: Path, **extra) -> Path:
    """The miniature grid over configs/tiny_cpu.yaml with the test's small built-in dataset."""
    shards = demo.train.rsplit("/", 1)[0]
    grid = {
        "base": str(REPO / "configs" / "tiny_cpu.yaml"),
        "output_dir": str(out),
        "overrides": [f"data.tokenizer={demo.tokenizer}", "data.workers=0", "data.sample_shuffle=64",
                      f"train.global_batch={G}", f"train.micro_batch={G}", "train.deepspeed=ds_configs/zero1.json",
                      f"phases.0.warmup_samples={G}", f"phases.1.samples={G}", "phases.1.warmup_samples=0",
                      f"checkpoint.every_samples={4 * G}", "logging.every_steps=1", "logging.masked_image_grid=false",
                      f"eval.sets.0.path={demo.zero_shot}", f"eval.sets.0.classnames={demo.classnames}",
                      f"eval.sets.0.templates={demo.templates}", f"eval.sets.1.path={demo.retrieval}",
                      "model.text_attention=causal"],
        "axes": {"model": {"tiny": {"name": "tiny"}, "tiny-wide": WIDE},
                 "data.train": {"256": [{"shards": f"{shards}/{{00000..00001}}.tar"}],
                                "512": [{"shards": f"{shards}/{{00000..00003}}.tar"}]},
                 "phases.0.samples": [4 * G, 8 * G]},
        "columns": {"model": "model", "data.train": "data", "phases.0.samples": "schedule"},
        **extra,
    }
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def sweep(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flip_ds", "sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def cells_of(out: Path) -> list[dict]:
    return json.loads((out / "cells.json").read_text())["cells"]


def final_eval(out: Path, cell: dict) -> dict:
    return json.loads((out / cell["dir"] / "eval" / f"samples_{cell['total_samples']:012d}.json").read_text())


CELLS = ["tiny_256_32", "tiny_256_64", "tiny_512_32", "tiny_512_64",
         "tiny-wide_256_32", "tiny-wide_256_64", "tiny-wide_512_32", "tiny-wide_512_64"]
KILLED = "tiny-wide_512_64"  # the last cell: the re-run skips the seven before it


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def local_sweep(demo_shards, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The grid swept here: signalled (SIGTERM to the sweep) while the last cell trains, then run
    again to the end. Returns (sweep dir, grid file, [first run's output, second run's output])."""
    root = tmp_path_factory.mktemp("local_sweep")
    out = root / "sweep"
    grid = write_grid(demo_shards, out, root / "grid.yaml")
    log = (root / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "flip_ds", "sweep", str(grid)], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
    killed_log = out / "cells" / KILLED / "train.log"
    deadline = time.time() + 600
    while not (killed_log.is_file() and "| step 1/" in killed_log.read_text()):
        assert first.poll() is None and time.time() < deadline, (root / "first.log").read_text()
        time.sleep(0.05)
    # the cell is frozen while the sweep is signalled, so the signal lands mid-cell however fast it trains
    trainer = child_pids(first.pid)
    for pid in trainer:
        os.kill(pid, signal.SIGSTOP)
    first.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    for pid in trainer:
        os.kill(pid, signal.SIGCONT)
    assert first.wait(300) == 75, (root / "first.log").read_text()
    log.close()
    second = sweep(str(grid))
    assert second.returncode == 0, second.stdout + second.stderr
    return out, grid, [(root / "first.log").read_text(), second.stdout]


def test_the_grid_crosses_its_axes_into_run_directories_with_full_recipes(local_sweep):
    out, _, _ = local_sweep
    cells = cells_of(out)
    assert [c["name"] for c in cells] == CELLS
    for cell in cells:
        recipe = yaml.safe_load((out / cell["dir"] / "recipe.yaml").read_text())
        labels = cell["labels"]
        model, data, schedule = labels["model"], labels["data.train"], labels["phases.0.samples"]
        assert recipe["output_dir"] == str(out / "cells" / cell["name"]) and recipe["resume"] == "auto"
        assert recipe["model"]["name"] == model and recipe["phases"][0]["samples"] == int(schedule)
        assert recipe["data"]["train"][0]["shards"].endswith("{00000..00001}.tar" if data == "256" else
                                                             "{00000..00003}.tar")
        # the merged shape keeps the model keys it does not name (the grid's overrides set this one)
        assert recipe["model"]["text_attention"] == "causal"
        if model == "tiny-wide":
            assert recipe["model"]["vision"]["width"] == 192 and recipe["model"]["embed_dim"] == 192
        assert cell["total_samples"] == int(schedule) + G
        record = final_eval(out, cell)
        assert record["samples_seen"] == cell["total_samples"] and record["model"] == model
        assert set(record["sets"]) == {"demo_zeroshot", "demo_retrieval"}
        assert record["train_seconds"] > 0
    assert (out / "cells.list").read_text().split() == [str(out / "cells" / n / "recipe.yaml") for n in CELLS]


def test_a_sweep_stopped_mid_cell_resumes_that_cell_and_skips_the_finished_ones(local_sweep):
    out, _, (first, second) = local_sweep
    assert f"stopped by a signal in cell '{KILLED}'" in first
    for name in CELLS[:-1]:
        assert f"'{name}': done, skipped" in second
    assert f"'{KILLED}': resuming" in second
    attempts = (out / "cells" / KILLED / "train.log").read_text().split("\n=== ")
    assert len(attempts) == 3  # '' before the first header, then the two runs of the cell
    stopped = int(re.search(r"stopped by signal 15 at step (\d+)", attempts[1]).group(1))
    assert 1 <= stopped < 9  # mid-cell: 8 masked steps + 1 tuning step
    assert re.search(rf"resumed from .*step_{stopped:08d} at step {stopped} ", attempts[2])
    # the resumed cell's samples and time add up across its two runs
    cell = next(c for c in cells_of(out) if c["name"] == KILLED)
    assert final_eval(out, cell)["samples_seen"] == 8 * G + G


def test_a_rerun_of_a_finished_sweep_trains_nothing(local_sweep):
    out, grid, _ = local_sweep
    stamps = {p: p.stat().st_mtime for p in out.glob("cells/*/eval/*.json")}
    third = sweep(str(grid))
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("done, skipped") == 8 and "training" not in third.stdout
    assert {p: p.stat().st_mtime for p in out.glob("cells/*/eval/*.json")} == stamps
    # a cell's own recipe, trained again (as a chained Slurm job does), finds the run complete
    recipe = out / "cells" / CELLS[0] / "recipe.yaml"
    again = subprocess.run([sys.executable, "-m", "flip_ds", "train", "--config", str(recipe)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "is complete (40 samples trained and evaluated); nothing to do" in again.stdout
    assert {p: p.stat().st_mtime for p in out.glob("cells/*/eval/*.json")} == stamps


def test_report_has_eight_rows_with_deltas_and_plots_that_decode(local_sweep):
    out, _, _ = local_sweep
    done = subprocess.run([sys.executable, "-m", "flip_ds", "report", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out / "report" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    base = final_eval(out, cells_of(out)[0])["sets"]["demo_zeroshot"]["metrics"]["top1"]
    for row, cell in zip(rows, cells_of(out)):
        top1 = final_eval(out, cell)["sets"]["demo_zeroshot"]["metrics"]["top1"]
        delta = next(v for k, v in row.items() if "top-1" in k and k.endswith("delta"))
        if cell["name"] == CELLS[0]:  # the baseline
            assert delta == ""
        else:
            assert float(delta) == pytest.approx(top1 - base, abs=1e-9)
    for png in ("accuracy_vs_samples.png", "accuracy_vs_time.png"):
        with Image.open(out / "report" / png) as image:
            image.verify()


def test_dry_run_prints_each_cell_with_the_planners_cost_and_trains_nothing(demo_shards, tmp_path):
    grid = write_grid(demo_shards, tmp_path / "sweep", tmp_path / "grid.yaml")
    done = sweep(str(grid), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"sweep {tmp_path / 'sweep'}: 8 cell(s)")
    table = {line.split()[0]: line.split() for line in lines[2:10]}
    assert set(table) == set(CELLS) and all(row[-1] == "yes" and "pending" in row for row in table.values())
    assert lines[-1].startswith("total: ") and "GPU-hours" in lines[-1]
    assert not (tmp_path / "sweep").exists()  # checked, printed, nothing written


@pytest.mark.skipif(not os.environ.get("SLURM_CONF"), reason="no Slurm cluster: run `slurm/local_cluster.sh up`")
def test_the_grid_runs_as_a_slurm_job_array(demo_shards, tmp_path):
    out = tmp_path / "sweep"
    grid = write_grid(demo_shards, out, tmp_path / "grid.yaml")
    done = sweep(str(grid), "--slurm", "--gpus-per-node", "0", "--cpus-per-task", "1", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    array = re.search(r"submitted job array\(s\) (\d+);", done.stdout).group(1)
    deadline = time.time() + 900
    while subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "the job array did not end in 900 s"
        time.sleep(1)
    logs = sorted((out / "slurm").glob(f"*-{array}_*.out"))
    assert len(logs) == 8, logs
    for cell in cells_of(out):
        assert final_eval(out, cell)["world_size"] == 1, cell["name"]
    again = sweep(str(grid), "--slurm", "--gpus-per-node", "0", "--cpus-per-task", "1", timeout=120)
    assert again.returncode == 0 and "every cell is done; nothing to submit" in again.stdout


# -- the grid file's checks: one line each, before anything runs ------------------------------------------
def test_cases_select_cells_and_name_the_baseline(demo_shards, tmp_path):
    cases = {"baseline": {"model": "tiny", "data.train": "256", "phases.0.samples": "32"},
             "model": {"model": "tiny-wide", "data.train": "256", "phases.0.samples": "32"},
             "joint": {"model": "tiny-wide", "data.train": "512", "phases.0.samples": "64"}}
    grid = load_grid(str(write_grid(demo_shards, tmp_path / "s", tmp_path / "g.yaml", cases=cases)))
    assert [(c.name, c.case) for c in grid.cells()] == [("baseline", "baseline"), ("model", "model"),
                                                         ("joint", "joint")]
    assert grid.baseline == "baseline"
    prepared = prepare(grid, 1, [])
    assert [p.recipe.model.name for p in prepared] == ["tiny", "tiny-wide", "tiny-wide"]
    assert [p.total_samples for p in prepared] == [5 * G, 5 * G, 9 * G]


@pytest.mark.parametrize("change, error", [
    ({"bogus": 1}, "unknown key 'bogus'; a grid has: base, output_dir"),
    ({"axes": {}}, "axes: a mapping of dotted recipe key -> values"),
    ({"axes": {"train.seed": [[1, 2]]}, "columns": {}},
     "axes.train.seed: [1, 2] is not a scalar; give this axis as a mapping"),
    ({"cases": {"a": {"model": "tiny"}}}, "cases.a: no label for axis 'data.train'"),
    ({"cases": {"a": {"model": "huge", "data.train": "256", "phases.0.samples": 32}}},
     "cases.a: 'huge' is not a label of axis 'model' (tiny, tiny-wide)"),
    ({"baseline": "nope"}, "baseline: 'nope' is not a cell"),
    ({"columns": {"optim.base_lr": "lr"}}, "columns: a mapping of axis key -> column name, for keys in axes"),
])
def test_a_bad_grid_is_one_line_naming_its_key(demo_shards, tmp_path, change, error):
    path = write_grid(demo_shards, tmp_path / "s", tmp_path / "g.yaml")
    grid = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError) as e:
        load_grid(str(path))
    assert f"sweep grid '{path}': {error}" in str(e.value)
    done = sweep(str(path), "--dry-run", timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_cell_that_cannot_run_stops_the_sweep_before_any_cell_trains(demo_shards, tmp_path):
    path = write_grid(demo_shards, tmp_path / "s", tmp_path / "g.yaml")
    grid = yaml.safe_load(path.read_text())
    grid["axes"]["model"]["tiny-wide"] = {**WIDE, "vision": {**WIDE["vision"], "heads": 5}}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    done = sweep(str(path), timeout=60)
    assert done.returncode == 2 and not (tmp_path / "s").exists()
    assert done.stderr.strip() == ("flip-ds: error: cell 'tiny-wide_256_32': model.vision.heads: width 192 does not "
                                   "split into 5 heads (remainder 2)")
    grid["axes"]["model"]["tiny-wide"] = WIDE
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    done = sweep(str(path), "--nproc", "3", "--dry-run", timeout=60)
    assert done.returncode == 2 and "cell 'tiny_256_32' on 3 rank(s): train.global_batch: 8" in done.stderr


def test_a_started_cell_whose_recipe_the_grid_changes_is_refused(demo_shards, tmp_path):
    path = write_grid(demo_shards, tmp_path / "s", tmp_path / "g.yaml")
    cells = prepare(load_grid(str(path)), 1, [])
    (cells[0].dir / "checkpoints").mkdir()
    (cells[0].dir / "checkpoints" / "latest").write_text("step_00000002")
    prepare(load_grid(str(path)), 1, [])  # the same grid again: fine
    with pytest.raises(ConfigError, match=f"cell '{cells[0].cell.name}': the grid changes the recipe of a cell that "
                                          "has started"):
        prepare(load_grid(str(path)), 1, ["optim.base_lr=1e-3"])
    # nothing was rewritten, not even the cells that have not started
    assert "base_lr: 0.001" not in cells[1].recipe_file.read_text()
