"""A scaling study's report: FLIP's joint-scaling table (paper Table 6) and accuracy plots.

Reads the directory `flip-ds sweep` writes (cells.json, each cell's eval/samples_*.json) and writes
report.md, report.csv and two PNGs. Only a cell's final evaluation (samples_seen == total_samples)
enters the table and the plots: a cell that has not finished shows "missing", never a number taken
from an earlier evaluation or from its neighbours. Imports no torch, so it runs on a login node
while the sweep trains.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flip_ds.config_loader import UsageError, check_flag

# The columns FLIP's Table 6 reports per eval set kind: (metric key, column suffix).
COLUMNS_OF_KIND = {"zero_shot": (("top1", "top-1"),),
                   "retrieval": (("i2t_r1", "I->T R@1"), ("t2i_r1", "T->I R@1"))}
SAMPLES_PLOT = "accuracy_vs_samples.png"
TIME_PLOT = "accuracy_vs_time.png"
MISSING = "missing"


@dataclass(frozen=True)
class Axis:
    key: str  # the recipe key the sweep varies, e.g. model.name
    column: str  # its table column, e.g. model


@dataclass(frozen=True)
class Evaluation:
    """One eval/samples_*.json: where training was, what it had cost, and each set's metrics."""

    samples_seen: int
    train_seconds: float
    world_size: int
    device: str
    sets: dict[str, tuple[str, dict[str, float]]]  # set name -> (kind, metrics)

    @property
    def device_hours(self) -> float:
        return self.train_seconds * self.world_size / 3600


@dataclass(frozen=True)
class Cell:
    name: str
    case: str | None
    labels: dict[str, str]  # axis key -> label
    model: str
    mask_ratio: float
    total_samples: int
    dir: Path
    evaluations: tuple[Evaluation, ...] = ()  # by samples seen

    @property
    def final(self) -> Evaluation | None:
        """The evaluation at the end of training; None: the cell is missing."""
        return next((e for e in self.evaluations if e.samples_seen == self.total_samples), None)

    @property
    def latest(self) -> Evaluation | None:
        """The furthest evaluation so far (the final one when complete)."""
        return self.evaluations[-1] if self.evaluations else None

    @property
    def row_name(self) -> str:
        return self.case or self.name

    @property
    def complete(self) -> bool:
        return self.final is not None

    @property
    def samples_seen(self) -> int:
        return self.latest.samples_seen if self.latest else 0

    def value(self, metric: Metric) -> float | None:
        """The final evaluation's value, or None when the cell or that set's result is missing."""
        if self.final is None or metric.set_name not in self.final.sets:
            return None
        return self.final.sets[metric.set_name][1].get(metric.key)


@dataclass(frozen=True)
class Sweep:
    sweep_dir: Path
    grid: str
    base: str
    axes: tuple[Axis, ...]
    baseline: Cell
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Metric:
    """One metric column, e.g. Metric('flickr', 'retrieval', 'i2t_r1', 'flickr I->T R@1')."""

    set_name: str
    kind: str
    key: str
    header: str


@dataclass(frozen=True)
class Point:
    name: str  # the cell's case, or its name
    x: float
    y: float  # percent


@dataclass(frozen=True)
class Line:
    """The complete cells of one (model, mask ratio), sorted by x, and the trend through them."""

    model: str
    mask_ratio: float
    points: tuple[Point, ...]
    trend: tuple[float, float] | None  # (a, b) of y = a + b * log10(x); None below 3 points

    @property
    def label(self) -> str:
        return f"{self.model}, mask {self.mask_ratio:g}"


@dataclass(frozen=True)
class Plot:
    file: Path
    title: str
    x_label: str
    y_label: str
    log_x: bool
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Report:
    sweep: Sweep
    metrics: tuple[Metric, ...]
    hours_label: str  # "GPU-hours" or "device-hours"
    table: str  # the markdown table, what `flip-ds report` prints
    plots: tuple[Plot, ...]  # empty when plots_skipped says why
    plots_skipped: str | None
    files: tuple[Path, ...]  # everything written


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Report:
    """Read the sweep in `sweep_dir` and write report.md, report.csv and the plots to `out_dir`
    (default: sweep_dir/report)."""
    sweep = load_sweep(Path(sweep_dir))
    out = Path(out_dir) if out_dir is not None else sweep.sweep_dir / "report"
    metrics = metric_columns(sweep.cells)
    on_gpus = any(c.latest and c.latest.device.startswith("cuda") for c in sweep.cells)
    hours_label = "GPU-hours" if on_gpus else "device-hours"
    table = markdown_table(sweep, metrics, hours_label)
    plots, skipped = plan_plots(sweep, metrics, hours_label, out)
    out.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        draw_plot(plot)
    csv_path = out / "report.csv"
    write_csv(csv_path, sweep, metrics, hours_label)
    md_path = out / "report.md"
    md_path.write_text(markdown_report(sweep, table, plots, skipped))
    return Report(sweep, metrics, hours_label, table, plots, skipped,
                  (md_path, csv_path, *(p.file for p in plots)))


def load_sweep(sweep_dir: Path) -> Sweep:
    """cells.json and every cell's evaluations; a missing or malformed file is a UsageError naming it."""
    path = sweep_dir / "cells.json"
    data = _read_json(path, f"not found: is {sweep_dir} a directory written by flip-ds sweep?")
    with _fields_of(path):
        axes = tuple(Axis(str(a["key"]), str(a["column"])) for a in data["axes"])
        cells = tuple(Cell(str(c["name"]), c.get("case"), {str(k): str(v) for k, v in c["labels"].items()},
                           str(c["model"]), float(c["mask_ratio"]), int(c["total_samples"]), sweep_dir / c["dir"])
                      for c in data["cells"])
        grid, base, baseline = str(data["grid"]), str(data["base"]), str(data["baseline"])
    check_flag(any(c.name == baseline for c in cells), f"{path}: baseline {baseline!r} is not one of its cells")
    cells = tuple(replace(c, evaluations=_load_evaluations(c.dir)) for c in cells)
    return Sweep(sweep_dir, grid, base, axes, next(c for c in cells if c.name == baseline), cells)


def _load_evaluations(cell_dir: Path) -> tuple[Evaluation, ...]:
    return tuple(sorted((_load_evaluation(p) for p in (cell_dir / "eval").glob("samples_*.json")),
                        key=lambda e: e.samples_seen))


def _load_evaluation(path: Path) -> Evaluation:
    data = _read_json(path, "not found")
    with _fields_of(path):
        return Evaluation(int(data["samples_seen"]), float(data["train_seconds"]), int(data["world_size"]),
                          str(data["device"]),
                          {str(name): (str(s["kind"]), {str(k): float(v) for k, v in s["metrics"].items()})
                           for name, s in data["sets"].items()})


@contextmanager
def _fields_of(path: Path) -> Iterator[None]:
    """A key or value the file's JSON lacks or has of the wrong type: one line naming the file."""
    try:
        yield
    except KeyError as e:
        raise UsageError(f"{path}: malformed, no key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{path}: malformed ({e})") from None


def _read_json(path: Path, if_absent: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: {if_absent}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def metric_columns(cells: tuple[Cell, ...]) -> tuple[Metric, ...]:
    """The metric columns, eval sets in the order first seen in the cells' final evaluations."""
    seen: dict[str, str] = {}
    for cell in cells:
        for name, (kind, _) in cell.final.sets.items() if cell.final else ():
            seen.setdefault(name, kind)
    return tuple(Metric(name, kind, key, f"{name} {suffix}")
                 for name, kind in seen.items() for key, suffix in COLUMNS_OF_KIND.get(kind, ()))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _delta_points(value: float, baseline: float) -> str:
    return f"{round(100 * (value - baseline), 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _count(n: int) -> str:
    """12800000000 -> 12.8B, as FLIP's tables write sample counts; small counts as they are."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= 10 * scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:#.3g}"  # three significant digits: 8.00, 16.0, 0.0167


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(sweep: Sweep, metrics: tuple[Metric, ...], hours_label: str) -> str:
    """A row per cell: case, axis labels, samples, time, metrics in % with the change against the baseline."""
    header = ["case", *(a.column for a in sweep.axes), "samples seen", "train time (min)", hours_label,
              *(m.header for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in sweep.cells:
        samples = _count(cell.samples_seen)
        if not cell.complete:
            samples += f" of {_count(cell.total_samples)}"
        row = [cell.row_name, *(cell.labels.get(a.key, "") for a in sweep.axes), samples,
               f"{cell.latest.train_seconds / 60:.1f}" if cell.latest else "-",
               _hours(cell.latest.device_hours) if cell.latest else "-"]
        for metric in metrics:
            value, base = cell.value(metric), sweep.baseline.value(metric)
            if value is None:
                row.append(MISSING)
            elif cell is sweep.baseline or base is None:
                row.append(_percent(value))
            else:
                row.append(f"{_percent(value)} ({_delta_points(value, base)})")
        lines.append("| " + " | ".join(_cell_text(v) for v in row) + " |")
    return "\n".join(lines)


def write_csv(path: Path, sweep: Sweep, metrics: tuple[Metric, ...], hours_label: str) -> None:
    """The table's numbers unrounded: fractions, deltas as fractions, empty where missing."""
    header = ["case", "cell", *(a.column for a in sweep.axes), "complete", "samples seen", "total samples",
              "train time (min)", hours_label]
    for metric in metrics:
        header += [metric.header, f"{metric.header} delta"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for cell in sweep.cells:
            row = [cell.row_name, cell.name, *(cell.labels.get(a.key, "") for a in sweep.axes), cell.complete,
                   cell.samples_seen, cell.total_samples,
                   cell.latest.train_seconds / 60 if cell.latest else "",
                   cell.latest.device_hours if cell.latest else ""]
            for metric in metrics:
                value, base = cell.value(metric), sweep.baseline.value(metric)
                has_delta = value is not None and base is not None and cell is not sweep.baseline
                row += ["" if value is None else value, value - base if has_delta else ""]
            writer.writerow(row)


def plan_plots(sweep: Sweep, metrics: tuple[Metric, ...], hours_label: str,
               out: Path) -> tuple[tuple[Plot, ...], str | None]:
    """The two plots of the first zero-shot set's top-1, or none and why."""
    metric = next((m for m in metrics if m.kind == "zero_shot"), None)
    if metric is None:
        return (), "no plots: no zero-shot eval set"
    if not any(c.complete for c in sweep.cells):
        return (), "no plots: no cell is complete"
    y_label = f"{metric.header} (%)"
    return (Plot(out / SAMPLES_PLOT, f"{metric.header} vs samples seen", "samples seen", y_label, True,
                 lines_of(sweep.cells, metric, lambda e: e.samples_seen)),
            Plot(out / TIME_PLOT, f"{metric.header} vs {hours_label}", hours_label, y_label, False,
                 lines_of(sweep.cells, metric, lambda e: e.device_hours))), None


def lines_of(cells: tuple[Cell, ...], metric: Metric, x_of: Callable[[Evaluation], float]) -> tuple[Line, ...]:
    """A line per (model, mask ratio), in the order first seen, through its complete cells. Points
    need x > 0: the trend is in log10(x)."""
    groups: dict[tuple[str, float], list[Point]] = {}
    for cell in cells:
        value = cell.value(metric)
        if cell.final is None or value is None or x_of(cell.final) <= 0:
            continue
        groups.setdefault((cell.model, cell.mask_ratio), []).append(Point(cell.row_name, x_of(cell.final),
                                                                          100 * value))
    return tuple(Line(model, mask, tuple(sorted(points, key=lambda p: p.x)), trend_fit(points))
                 for (model, mask), points in groups.items())


def trend_fit(points: list[Point]) -> tuple[float, float] | None:
    """(a, b) of the least-squares y = a + b * log10(x), from 3 points up; a fit needs 2 distinct x."""
    if len(points) < 3 or len({p.x for p in points}) < 2:
        return None
    b, a = np.polyfit(np.log10([p.x for p in points]), [p.y for p in points], 1)
    return float(a), float(b)


def draw_plot(plot: Plot) -> None:
    # The Agg canvas directly, not pyplot: no display, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for line in plot.lines:
        xs, ys = [p.x for p in line.points], [p.y for p in line.points]
        color = ax.plot(xs, ys, marker="o", label=line.label)[0].get_color()
        for p in line.points:
            ax.annotate(p.name, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if line.trend is not None:
            a, b = line.trend
            fit_x = np.geomspace(min(xs), max(xs), 50)
            ax.plot(fit_x, a + b * np.log10(fit_x), linestyle="--", color=color, linewidth=1)
    if plot.log_x:
        ax.set_xscale("log")
    ax.set_title(plot.title)
    ax.set_xlabel(plot.x_label)
    ax.set_ylabel(plot.y_label)
    ax.margins(0.08)  # room for the case names next to the outermost points
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(plot.file, dpi=120)


def markdown_report(sweep: Sweep, table: str, plots: tuple[Plot, ...], plots_skipped: str | None) -> str:
    complete = sum(c.complete for c in sweep.cells)
    missing = [c.row_name for c in sweep.cells if not c.complete]
    baseline = sweep.baseline.row_name
    lines = ["# Scaling report", "",
             f"- sweep: `{sweep.sweep_dir}`",
             f"- grid: `{sweep.grid}`",
             f"- base recipe: `{sweep.base}`",
             f"- cells complete: {complete} of {len(sweep.cells)}" + (f" (missing: {', '.join(missing)})"
                                                                     if missing else ""),
             f"- metrics in % at the end of training; in parentheses, the change in points against `{baseline}`"
             + ("" if sweep.baseline.complete else f" (`{baseline}` is missing: no changes shown)"),
             "", table, ""]
    lines += [f"![{p.title}]({p.file.name})" for p in plots] or [plots_skipped]
    return "\n".join(lines) + "\n"
