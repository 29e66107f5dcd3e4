"""A scaling study as a grid of ordinary training runs: a base recipe, axes to cross, cases to keep.

A grid file names a base recipe and, for any dotted recipe keys, the values to cross:

    base: configs/flip_l16_laion400m.yaml
    output_dir: runs/joint_scaling
    axes:
      model.name: [L/16, H/14]                      # a list: each value is its own label
      data.train: {400m: [...], 2b: [...]}          # a mapping: label -> value
      phases.0.epochs: {12.8B: 10000, 25.6B: 20000}
    columns: {model.name: model, data.train: data, phases.0.epochs: samples}
    cases:                                          # optional: only these cells, by name
      baseline: {model.name: L/16, data.train: 400m, phases.0.epochs: 12.8B}
      ...

Every cell becomes OUTPUT_DIR/cells/NAME, a run directory like any other: its full recipe
(recipe.yaml, `resume: auto`), then the trainer's checkpoints/, tensorboard/ and eval/. A cell
is done when its last checkpoint is the run's last step and its final evaluation is written, so
running the sweep again skips done cells and resumes the others where their checkpoints stand.
OUTPUT_DIR/cells.json lists the cells and their labels for `flip-ds report`; cells.list their
recipes, one a line, for a Slurm job array (slurm/train.sbatch @cells.list).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flip_ds import run_dir
from flip_ds.config import Recipe
from flip_ds.config_loader import ConfigError, apply_overrides, from_dict, read_yaml, set_dotted, to_dict
from flip_ds.engine_config import validate_for_launch

GRID_KEYS = ("base", "output_dir", "overrides", "axes", "columns", "cases", "baseline")


@dataclass
class Axis:
    key: str  # a dotted recipe key
    column: str  # its column in the report
    values: dict[str, Any]  # label -> the value the key takes, in the grid's order


@dataclass
class Cell:
    name: str
    case: str | None  # the case that names it; None in a full cross product
    labels: dict[str, str]  # axis key -> label


@dataclass
class Grid:
    path: str
    base: str
    output_dir: Path
    overrides: list[str]
    axes: list[Axis]
    cases: dict[str, dict[str, str]] = field(default_factory=dict)
    baseline: str = ""

    def cells(self) -> list[Cell]:
        """The cases in the grid's order, or else every combination of labels (the last axis fastest)."""
        if self.cases:
            return [Cell(_dir_name(name), name, labels) for name, labels in self.cases.items()]
        combos = itertools.product(*(a.values for a in self.axes))
        cells = []
        for labels in combos:
            cells.append(Cell(_dir_name("_".join(labels)), None, {a.key: label for a, label in zip(self.axes, labels)}))
        return cells

    def recipe(self, cell: Cell, extra_overrides: list[str]) -> Recipe:
        """The cell's full recipe: the base, the grid's and the command line's overrides, the cell's
        axis values, its own output_dir, resume=auto and eval.at_end."""
        tree = read_yaml(self.base)
        try:
            apply_overrides(tree, [*self.overrides, *extra_overrides])
            for axis in self.axes:
                set_dotted(tree, axis.key, _merged(_get_dotted(tree, axis.key), axis.values[cell.labels[axis.key]]))
            tree["output_dir"], tree["resume"] = str(self.output_dir / "cells" / cell.name), "auto"
            tree.setdefault("eval", {})["at_end"] = True  # the report's numbers: the eval sets at the end
            return from_dict(Recipe, tree)
        except ConfigError as e:
            raise ConfigError(f"cell '{cell.name}': {e}") from None


def _get_dotted(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _merged(current: Any, value: Any) -> Any:
    """`value` laid over the base's `current`: a mapping onto a mapping merges key by key (an axis
    `model: {wide: {name: wide, vision: {width: 192}}}` keeps the base's other model keys); anything
    else replaces it."""
    if not (isinstance(current, dict) and isinstance(value, dict)):
        return copy.deepcopy(value)
    merged = copy.deepcopy(current)
    for key, v in value.items():
        merged[key] = _merged(merged.get(key), v)
    return merged


def _dir_name(label: str) -> str:
    """A label as a directory name: 'L/16_2b' -> 'L-16_2b'."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", label).strip("-") or "cell"


def _label(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: {value!r} is not a scalar; give this axis as a mapping of label: value")
    return str(value)


def load_grid(path: str) -> Grid:
    """Read and check a grid file; every error is one line naming the grid key."""
    raw = read_yaml(path)
    where = f"sweep grid '{path}'"
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; a grid has: {', '.join(GRID_KEYS)}")
    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{where}: base: name the base recipe, e.g. base: configs/flip_l16_laion400m.yaml")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: overrides: a list of KEY=VALUE strings")
    axes_raw, columns = raw.get("axes"), raw.get("columns") or {}
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise ConfigError(f"{where}: axes: a mapping of dotted recipe key -> values, e.g. model.name: [L/16, H/14]")
    if not isinstance(columns, dict) or set(columns) - set(axes_raw):
        raise ConfigError(f"{where}: columns: a mapping of axis key -> column name, for keys in axes")
    axes = []
    for key, values in axes_raw.items():
        if isinstance(values, list):
            values = {_label(v, f"{where}: axes.{key}"): v for v in values}
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where}: axes.{key}: a non-empty list of values or mapping of label: value")
        axes.append(Axis(str(key), str(columns.get(key, key)), {str(k): v for k, v in values.items()}))
    cases = _read_cases(raw.get("cases") or {}, axes, where)
    output_dir = Path(raw.get("output_dir") or f"runs/sweep_{Path(path).stem}")
    grid = Grid(path, raw["base"], output_dir, overrides, axes, cases)
    names = [c.name for c in grid.cells()]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"{where}: two cells share the directory name '{duplicated[0]}'; relabel them")
    grid.baseline = str(raw.get("baseline") or grid.cells()[0].name)
    if grid.baseline not in names:
        raise ConfigError(f"{where}: baseline: '{grid.baseline}' is not a cell ({', '.join(names)})")
    return grid


def _read_cases(raw: Any, axes: list[Axis], where: str) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: cases: a mapping of case name -> {{axis key: label}}")
    cases = {}
    for name, picks in raw.items():
        if not isinstance(picks, dict):
            raise ConfigError(f"{where}: cases.{name}: a mapping of axis key -> label")
        extra = sorted(set(picks) - {a.key for a in axes})
        if extra:
            raise ConfigError(f"{where}: cases.{name}: '{extra[0]}' is not an axis")
        labels = {}
        for axis in axes:
            if axis.key not in picks:
                raise ConfigError(f"{where}: cases.{name}: no label for axis '{axis.key}'")
            label = str(picks[axis.key])
            if label not in axis.values:
                raise ConfigError(f"{where}: cases.{name}: '{label}' is not a label of axis '{axis.key}' "
                                  f"({', '.join(axis.values)})")
            labels[axis.key] = label
        cases[str(name)] = labels
    return cases


# -- the cells on disk --------------------------------------------------------------------------
@dataclass
class PreparedCell:
    cell: Cell
    recipe: Recipe
    dir: Path

    @property
    def recipe_file(self) -> Path:
        return self.dir / "recipe.yaml"

    @property
    def total_samples(self) -> int:
        return run_dir.total_samples(self.recipe)

    def status(self) -> run_dir.State:
        return run_dir.state(self.recipe)


def prepare(grid: Grid, world_size: int, extra_overrides: list[str], write: bool = True) -> list[PreparedCell]:
    """Every cell's recipe, checked for `world_size` ranks before anything is written or run; then,
    when `write`, the recipes, cells.json and cells.list are written. A started cell whose recipe
    the grid now changes is refused: its checkpoints belong to the old one."""
    prepared = []
    for cell in grid.cells():
        recipe = grid.recipe(cell, extra_overrides)
        try:
            validate_for_launch(recipe, world_size)
        except ConfigError as e:
            raise ConfigError(f"cell '{cell.name}' on {world_size} rank(s): {e}") from None
        prepared.append(PreparedCell(cell, recipe, Path(recipe.output_dir)))
    texts = [yaml.safe_dump(to_dict(p.recipe), sort_keys=False) for p in prepared]
    for p, text in zip(prepared, texts):
        if p.recipe_file.is_file() and p.recipe_file.read_text() != text and p.status() != "pending":
            raise ConfigError(f"cell '{p.cell.name}': the grid changes the recipe of a cell that has started "
                              f"({p.recipe_file}); use another output_dir, or delete {p.dir} to retrain it")
    if not write:
        return prepared
    for p, text in zip(prepared, texts):
        p.dir.mkdir(parents=True, exist_ok=True)
        p.recipe_file.write_text(text)
    _write_index(grid, prepared, world_size)
    return prepared


def _write_index(grid: Grid, prepared: list[PreparedCell], world_size: int) -> None:
    root = grid.output_dir
    root.mkdir(parents=True, exist_ok=True)
    (root / "grid.yaml").write_text(Path(grid.path).read_text())
    index = {
        "grid": grid.path, "base": grid.base,
        "axes": [{"key": a.key, "column": a.column, "labels": list(a.values)} for a in grid.axes],
        "baseline": grid.baseline,
        "cells": [{"name": p.cell.name, "case": p.cell.case, "labels": p.cell.labels,
                   "dir": str(p.dir.relative_to(root)), "model": p.recipe.model.name,
                   "mask_ratio": p.recipe.phases[0].mask_ratio, "total_samples": p.total_samples,
                   "world_size": world_size} for p in prepared],
    }
    (root / "cells.json").write_text(json.dumps(index, indent=2))
    (root / "cells.list").write_text("".join(f"{p.recipe_file.absolute()}\n" for p in prepared))
