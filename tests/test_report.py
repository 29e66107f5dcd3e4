"""`flip-ds report` on sweep directories written by hand: the table and its deltas, missing cells,
the CSV, the plots and their trend fits, and the CLI's one-line error."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from flip_ds.cli import main
from flip_ds.config_loader import UsageError
from flip_ds.report import Report, write_report

REPO = Path(__file__).resolve().parent.parent
AXES = [{"key": "model.name", "column": "model", "labels": ["tiny", "small"]},
        {"key": "data.train", "column": "data", "labels": ["1k", "3k"]},
        {"key": "phases.0.samples", "column": "schedule", "labels": ["256", "512"]}]
TOTAL = {"256": 384, "512": 640}  # the schedule's samples plus a 128-sample unmasked tuning phase


def zero_shot(top1: str) -> dict:
    return {"kind": "zero_shot", "metrics": {"top1": float(top1), "top5": 0.9, "mean_per_class": float(top1)}}


def retrieval(i2t: str, t2i: str) -> dict:
    return {"kind": "retrieval", "metrics": {"i2t_r1": float(i2t), "i2t_r5": 0.5, "i2t_r10": 0.7,
                                             "t2i_r1": float(t2i), "t2i_r5": 0.5, "t2i_r10": 0.7}}


def write_eval(sweep: Path, cell: dict, samples: int, sets: dict, train_seconds: float, device: str = "cpu",
               world_size: int = 1) -> None:
    path = sweep / cell["dir"] / "eval" / f"samples_{samples:012d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"samples_seen": samples, "step": samples // 32, "total_samples": cell["total_samples"],
                                "train_seconds": train_seconds, "world_size": world_size, "device": device,
                                "sets": sets}))


def cell_entry(name: str, case: str | None, model: str, data: str, schedule: str, mask_ratio: float = 0.5) -> dict:
    labels = {"model.name": model, "data.train": data, "phases.0.samples": schedule}
    return {"name": name, "case": case, "labels": labels,
            "dir": f"cells/{name}", "model": model, "mask_ratio": mask_ratio, "total_samples": TOTAL[schedule],
            "world_size": 1}


def write_cells_json(sweep: Path, cells: list[dict], baseline: str) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "cells.json").write_text(json.dumps({"grid": "configs/sweeps/x.yaml", "base": "configs/tiny_cpu.yaml",
                                                  "axes": AXES, "baseline": baseline, "cells": cells}))


# 2x2x2 grid (no case names): zero-shot top-1, retrieval I->T and T->I R@1 at the end of training.
GRID_METRICS = {"tiny-1k-256": ("0.358", "0.120", "0.105"), "tiny-1k-512": ("0.381", "0.131", "0.118"),
                "tiny-3k-256": ("0.341", "0.127", "0.099"), "tiny-3k-512": ("0.402", "0.144", "0.123"),
                "small-1k-256": ("0.377", "0.133", "0.121"), "small-1k-512": ("0.415", "0.151", "0.139"),
                "small-3k-256": ("0.396", "0.142", "0.128"), "small-3k-512": None}  # unfinished
GRID_BASELINE = "tiny-1k-256"


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    """The 8-cell cross product; small-3k-512 stopped at 256 of 640 samples."""
    sweep = tmp_path / "grid"
    cells = [cell_entry(f"{m}-{d}-{s}", None, m, d, s) for m in ("tiny", "small") for d in ("1k", "3k")
             for s in ("256", "512")]
    write_cells_json(sweep, cells, GRID_BASELINE)
    for i, cell in enumerate(cells):
        write_eval(sweep, cell, 128, {"demo_zeroshot": zero_shot("0.1"), "demo_retrieval": retrieval("0.05", "0.05")},
                   10.0 + i)
        metrics = GRID_METRICS[cell["name"]]
        if metrics is None:
            write_eval(sweep, cell, 256, {"demo_zeroshot": zero_shot("0.2"),
                                          "demo_retrieval": retrieval("0.08", "0.08")}, 20.0)
        else:
            top1, i2t, t2i = metrics
            write_eval(sweep, cell, cell["total_samples"], {"demo_zeroshot": zero_shot(top1),
                                                            "demo_retrieval": retrieval(i2t, t2i)},
                       60.0 * (i + 1))
    return sweep


# FLIP's Table 6 layout: a baseline and one case per scaled axis or combination, on 8 GPUs.
FLIP_CASES = [("c0", "baseline", "tiny", "1k", "256", 0.5, 3600.0, ("0.300", "0.200", "0.180", "0.150", "0.140")),
              ("c1", "model", "small", "1k", "256", 0.5, 7200.0, ("0.350", "0.230", "0.210", "0.170", "0.160")),
              ("c2", "data", "tiny", "3k", "256", 0.5, 3700.0, ("0.320", "0.220", "0.200", "0.160", "0.150")),
              ("c3", "schedule", "tiny", "1k", "512", 0.5, 6000.0, ("0.340", "0.240", "0.215", "0.175", "0.165")),
              ("c4", "model+data", "small", "3k", "256", 0.5, 7300.0, ("0.370", "0.250", "0.225", "0.185", "0.170")),
              ("c5", "joint", "small", "3k", "512", 0.75, 9000.0, ("0.410", "0.280", "0.260", "0.205", "0.190"))]


@pytest.fixture
def flip_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "flip"
    cells = [cell_entry(name, case, m, d, s, mask) for name, case, m, d, s, mask, _, _ in FLIP_CASES]
    write_cells_json(sweep, cells, "c0")
    for cell, (*_, seconds, (top1, f_i2t, f_t2i, c_i2t, c_t2i)) in zip(cells, FLIP_CASES):
        write_eval(sweep, cell, cell["total_samples"],
                   {"imagenet": zero_shot(top1), "flickr30k": retrieval(f_i2t, f_t2i),
                    "coco": retrieval(c_i2t, c_t2i)}, seconds, device="cuda:0", world_size=8)
    return sweep


def table_rows(table: str) -> list[dict[str, str]]:
    lines = [line.strip("|").split(" | ") for line in table.splitlines()]
    header = [h.strip() for h in lines[0]]
    assert set(lines[1][0]) <= set("-|"), lines[1]
    return [dict(zip(header, (v.strip() for v in row), strict=True)) for row in lines[2:]]


def csv_rows(report: Report) -> list[dict[str, str]]:
    with (report.files[1]).open(newline="") as f:
        return list(csv.DictReader(f))


def expected_cell(value: str, baseline: str | None) -> str:
    """Percent with one decimal and the change in points, by decimal arithmetic (not the report's)."""
    pct = (Decimal(value) * 100).quantize(Decimal("0.1"))
    if baseline is None:
        return str(pct)
    delta = ((Decimal(value) - Decimal(baseline)) * 100).quantize(Decimal("0.1"))
    return f"{pct} ({'+' if delta >= 0 else ''}{delta})"


def test_grid_table_has_a_row_per_cell_with_deltas_against_the_baseline(grid_sweep):
    report = write_report(grid_sweep)
    rows = table_rows(report.table)
    assert len(rows) == 8
    assert list(rows[0]) == ["case", "model", "data", "schedule", "samples seen", "train time (min)",
                             "device-hours", "demo_zeroshot top-1", "demo_retrieval I->T R@1",
                             "demo_retrieval T->I R@1"]
    assert [r["case"] for r in rows] == list(GRID_METRICS)  # no case names: the cell's name
    base = GRID_METRICS[GRID_BASELINE]
    for row in rows:
        metrics = GRID_METRICS[row["case"]]
        if metrics is None:
            continue
        for column, value, base_value in zip(list(row)[-3:], metrics, base):
            assert row[column] == expected_cell(value, None if row["case"] == GRID_BASELINE else base_value)
    by_case = {r["case"]: r for r in rows}
    assert by_case["tiny-1k-512"]["demo_zeroshot top-1"] == "38.1 (+2.3)"
    assert by_case["tiny-3k-256"]["demo_zeroshot top-1"] == "34.1 (-1.7)"
    assert by_case[GRID_BASELINE]["demo_zeroshot top-1"] == "35.8"
    assert by_case["tiny-1k-512"]["model"] == "tiny" and by_case["tiny-1k-512"]["schedule"] == "512"
    assert by_case["tiny-1k-512"]["samples seen"] == "640"
    assert by_case["tiny-1k-512"]["train time (min)"] == "2.0"  # 120 s


def test_missing_cell_shows_missing_and_is_never_interpolated_or_plotted(grid_sweep):
    report = write_report(grid_sweep)
    row = {r["case"]: r for r in table_rows(report.table)}["small-3k-512"]
    assert row["samples seen"] == "256 of 640"  # how far it got; its metrics at 256 samples are not shown
    assert [row[c] for c in list(row)[-3:]] == ["missing"] * 3
    csv_row = {r["cell"]: r for r in csv_rows(report)}["small-3k-512"]
    assert csv_row["complete"] == "False" and csv_row["samples seen"] == "256"
    assert all(csv_row[k] == "" for k in csv_row if k.startswith("demo_"))
    for plot in report.plots:
        names = [p.name for line in plot.lines for p in line.points]
        assert "small-3k-512" not in names and len(names) == 7
    assert "cells complete: 7 of 8 (missing: small-3k-512)" in report.files[0].read_text()


def test_cell_without_any_evaluation_reports_zero_samples(grid_sweep):
    for path in (grid_sweep / "cells" / "small-3k-512" / "eval").iterdir():
        path.unlink()
    row = {r["case"]: r for r in table_rows(write_report(grid_sweep).table)}["small-3k-512"]
    assert row["samples seen"] == "0 of 640" and row["train time (min)"] == "-"


def test_csv_has_raw_fractions_and_a_delta_column_per_metric(grid_sweep):
    report = write_report(grid_sweep)
    rows = csv_rows(report)
    metric_columns = ["demo_zeroshot top-1", "demo_retrieval I->T R@1", "demo_retrieval T->I R@1"]
    assert list(rows[0]) == ["case", "cell", "model", "data", "schedule", "complete", "samples seen",
                             "total samples", "train time (min)", "device-hours",
                             *(c for m in metric_columns for c in (m, f"{m} delta"))]
    base = GRID_METRICS[GRID_BASELINE]
    for row in rows:
        metrics = GRID_METRICS[row["cell"]]
        if metrics is None:
            continue
        for column, value, base_value in zip(metric_columns, metrics, base):
            assert float(row[column]) == pytest.approx(float(value))
            if row["cell"] == GRID_BASELINE:
                assert row[f"{column} delta"] == ""
            else:
                assert float(row[f"{column} delta"]) == pytest.approx(float(value) - float(base_value))
    minutes = {r["cell"]: float(r["train time (min)"]) for r in rows}
    assert minutes["tiny-1k-256"] == pytest.approx(1.0) and minutes["small-3k-512"] == pytest.approx(20 / 60)


def test_plots_decode_and_show_a_line_per_model_and_mask_ratio(grid_sweep):
    report = write_report(grid_sweep)
    assert [p.file.name for p in report.plots] == ["accuracy_vs_samples.png", "accuracy_vs_time.png"]
    for plot in report.plots:
        assert plot.file.parent == grid_sweep / "report"
        with Image.open(plot.file) as image:
            image.verify()
        with Image.open(plot.file) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        assert [(line.model, line.mask_ratio, len(line.points)) for line in plot.lines] == \
            [("tiny", 0.5, 4), ("small", 0.5, 3)]
        for line in plot.lines:
            assert [p.x for p in line.points] == sorted(p.x for p in line.points)
    samples = report.plots[0]
    assert samples.log_x and samples.x_label == "samples seen"
    tiny = {p.name: p for p in samples.lines[0].points}
    assert tiny["tiny-1k-512"].x == 640 and tiny["tiny-1k-512"].y == pytest.approx(38.1)
    time = report.plots[1]
    assert time.x_label == "device-hours"
    assert {p.name: p.x for p in time.lines[0].points}["tiny-1k-512"] == pytest.approx(120 / 3600)
    md = report.files[0].read_text()
    assert "![" in md and "(accuracy_vs_samples.png)" in md and "(accuracy_vs_time.png)" in md


def test_flip_cases_on_gpus_label_gpu_hours_and_fit_trends_from_three_points(flip_sweep, tmp_path):
    out = tmp_path / "elsewhere"
    report = write_report(flip_sweep, out)
    assert all(f.parent == out for f in report.files) and not (flip_sweep / "report").exists()
    rows = table_rows(report.table)
    assert [r["case"] for r in rows] == ["baseline", "model", "data", "schedule", "model+data", "joint"]
    assert list(rows[0])[6:] == ["GPU-hours", "imagenet top-1", "flickr30k I->T R@1", "flickr30k T->I R@1",
                                 "coco I->T R@1", "coco T->I R@1"]
    assert rows[0]["GPU-hours"] == "8.00" and rows[-1]["GPU-hours"] == "20.0"  # 3600 s and 9000 s on 8 GPUs
    assert rows[-1]["imagenet top-1"] == "41.0 (+11.0)" and rows[-1]["coco T->I R@1"] == "19.0 (+5.0)"
    assert {r["case"]: float(r["GPU-hours"]) for r in csv_rows(report)}["model"] == pytest.approx(16.0)

    samples, time = report.plots
    assert time.x_label == "GPU-hours" and time.title.endswith("GPU-hours")
    for plot in (samples, time):
        trends = {(line.model, line.mask_ratio): (len(line.points), line.trend is not None) for line in plot.lines}
        assert trends == {("tiny", 0.5): (3, True), ("small", 0.5): (2, False), ("small", 0.75): (1, False)}
    # baseline and data at 384 samples, schedule at 640: least squares goes through their mean at 384
    a, b = samples.lines[0].trend
    slope = (34.0 - (30.0 + 32.0) / 2) / (math.log10(640) - math.log10(384))
    assert b == pytest.approx(slope) and a + b * math.log10(640) == pytest.approx(34.0)


def test_plots_skipped_without_a_zero_shot_set(tmp_path):
    sweep = tmp_path / "retrieval_only"
    cells = [cell_entry("a", None, "tiny", "1k", "256"), cell_entry("b", None, "tiny", "1k", "512")]
    write_cells_json(sweep, cells, "a")
    for cell in cells:
        write_eval(sweep, cell, cell["total_samples"], {"flickr": retrieval("0.1", "0.2")}, 30.0)
    report = write_report(sweep)
    assert report.plots == () and "zero-shot" in report.plots_skipped
    assert report.plots_skipped in report.files[0].read_text()
    assert not list((sweep / "report").glob("*.png"))


def test_missing_baseline_shows_no_deltas(grid_sweep):
    for path in (grid_sweep / "cells" / GRID_BASELINE / "eval").glob("samples_000000000384.json"):
        path.unlink()
    rows = table_rows(write_report(grid_sweep).table)
    assert rows[1]["demo_zeroshot top-1"] == "38.1"
    assert all("(" not in v for r in rows for v in r.values())


@pytest.mark.parametrize("content, says", [(None, "not found"), ("{not json", "not valid JSON"),
                                           ('{"grid": "g"}', "no key"), ('[]', "malformed")])
def test_bad_cells_json_is_a_usage_error_naming_the_file(tmp_path, content, says):
    if content is not None:
        (tmp_path / "cells.json").write_text(content)
    with pytest.raises(UsageError, match=says) as error:
        write_report(tmp_path)
    assert str(tmp_path / "cells.json") in str(error.value) and "\n" not in str(error.value)


def test_baseline_not_among_the_cells_says_so(tmp_path):
    write_cells_json(tmp_path, [cell_entry("a", None, "tiny", "1k", "256")], "x")
    with pytest.raises(UsageError) as error:
        write_report(tmp_path)
    assert str(error.value) == f"{tmp_path / 'cells.json'}: baseline 'x' is not one of its cells"


@pytest.mark.parametrize("content, says", [("{truncated", "not valid JSON"), ('{"samples_seen": 384}', "no key")])
def test_bad_eval_json_is_a_usage_error_naming_it(grid_sweep, content, says):
    path = grid_sweep / "cells" / "tiny-1k-512" / "eval" / "samples_000000000640.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=says) as error:
        write_report(grid_sweep)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_cli_prints_the_table(grid_sweep, capsys):
    assert main(["report", str(grid_sweep)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("| case | model | data | schedule |") and captured.out.count("\n") == 10
    assert "7 of 8 cells complete" in captured.err and "report.csv" in captured.err


def test_cli_without_cells_json_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flip_ds", "report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("flip-ds: error:")
    assert "cells.json" in result.stderr
