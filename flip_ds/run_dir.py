"""What a run's output_dir holds, and how far the run has got, read without torch.

    OUTPUT_DIR/checkpoints/      step_NNNNNNNN/ tags and `latest` (flip_ds.checkpoint)
    OUTPUT_DIR/tensorboard/      event files
    OUTPUT_DIR/eval/             samples_NNNNNNNNNNNN.json, one per evaluation (what `flip-ds report` reads)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from flip_ds.config import Recipe
from flip_ds.schedule import PhasePlan

State = Literal["pending", "partial", "done"]


def eval_record(output_dir: Path, samples: int) -> Path:
    """The JSON of the evaluation after `samples` samples."""
    return output_dir / "eval" / f"samples_{samples:012d}.json"


def total_samples(recipe: Recipe) -> int:
    """The samples the run trains on: whole global batches, every phase rounded up."""
    return PhasePlan(recipe.phases, recipe.optim, recipe.train.global_batch).total_steps * recipe.train.global_batch


def state(recipe: Recipe) -> State:
    """'done' once the newest checkpoint is the last step and, where the recipe evaluates at the end,
    that evaluation is written; 'partial' with a checkpoint to resume from; else 'pending'."""
    out = Path(recipe.output_dir)
    latest = out / "checkpoints" / "latest"
    if not latest.is_file():
        return "pending"
    meta = out / "checkpoints" / latest.read_text().strip() / "meta.json"
    samples = json.loads(meta.read_text())["samples_seen"] if meta.is_file() else -1
    total = total_samples(recipe)
    evaluated = not (recipe.eval.at_end and recipe.eval.sets) or eval_record(out, total).is_file()
    return "done" if samples == total and evaluated else "partial"
