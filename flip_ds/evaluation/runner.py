"""In-training evaluation over the recipe's eval sets, called on every rank.

`model` may be a DeepSpeed ZeRO-3 engine's module: only submodule forwards are called (never a
parameter read outside one), so ZeRO-3's hooks gather the partitioned weights, and every rank
makes the same forward calls (see features.py).
"""

from __future__ import annotations

import logging

import torch

from flip_ds.data.tokenizer import Tokenizer
from flip_ds.evaluation.config import EvalSet
from flip_ds.evaluation.datasets import read_image_folder, read_retrieval_set
from flip_ds.evaluation.features import Shard
from flip_ds.evaluation.prompts import load_classnames, load_templates
from flip_ds.evaluation.retrieval import evaluate_retrieval
from flip_ds.evaluation.zero_shot import evaluate_zero_shot

log = logging.getLogger(__name__)


def check_sets(sets: list[EvalSet]) -> None:
    """Read every set's listing and prompts once, so a bad path fails at start-up, not hours in."""
    for s in sets:
        if s.kind == "zero_shot":
            load_classnames(s.classnames, read_image_folder(s.path).classes)
            load_templates(s.templates)
        else:
            read_retrieval_set(s.path, s.image_root, s.split)


def evaluate(model: torch.nn.Module, sets: list[EvalSet], tokenizer: Tokenizer, image_size: int,
             device: str | torch.device, dtype: torch.dtype, progress: bool = False) -> dict[str, dict[str, float]]:
    """{set name: {metric: value}}: zero_shot sets give top1 (top5 with more than 5 classes) and
    mean_per_class; retrieval sets give i2t_r1/5/10 and t2i_r1/5/10. Values are fractions in [0, 1]."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for s in sets:
            common = dict(image_size=image_size, batch_size=s.batch_size, workers=s.workers, device=device,
                          dtype=dtype, progress=progress)
            if s.kind == "zero_shot":
                data = read_image_folder(s.path)
                result = evaluate_zero_shot(model, tokenizer, data, load_classnames(s.classnames, data.classes),
                                            load_templates(s.templates), **common)
            else:
                result = evaluate_retrieval(model, tokenizer, read_retrieval_set(s.path, s.image_root, s.split),
                                            **common)
            if result.skipped_images and Shard.current().rank == 0:
                log.warning(f"eval {s.name}: skipped {result.skipped_images} unreadable image(s)")
            results[s.name] = result.metrics
    finally:
        model.train(was_training)
    return results
