"""Class-ordered input, as a new user makes it: a class-per-folder tree through `flip-ds make-shards`.

The tree: 10 classes of 64 rendered images each (a coloured shape per class, captioned "a photo of a
red circle."). With the tiny recipe's buffer scaled to the tree (data.sample_shuffle 32, half a
class, as the report's 500-sample buffer against 600-image classes), shards written in class order
give batches of a single caption: the loss stays at ln(batch) and zero-shot accuracy at chance
(measured, 1,536 samples on one rank: loss 3.466 = ln 32, top-1 11% on 80 held-out images, chance
10%). make-shards shuffles by default, and the same training then learns (measured: 57% and 54%
with training seeds 0 and 1; 36-45% after 1,024 samples); the trainer warns about the unshuffled
shards and counts them in TensorBoard.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flip_ds.cli import main
from flip_ds.data.synthetic import random_scene, render
from flip_ds.metrics import CaptionRepeats
from tests.distributed_helpers import REPO, scalars, torchrun

CLASSES = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star"), ("purple", "cross"),
           ("orange", "circle"), ("red", "square"), ("green", "triangle"), ("blue", "star"), ("yellow", "cross")]
PER_CLASS, EVAL_PER_CLASS = 64, 8
BUFFER = 32  # data.sample_shuffle: a block of 32 consecutive class-ordered samples is one class
SAMPLES = 1536  # 48 steps of 32: about 20 s on 2 cores
CHANCE = 1 / len(CLASSES)
# 80 held-out images: a model that learned nothing gets 8 right on average (standard deviation 2.7);
# 25% (20 of 80) is 4.5 standard deviations above that, and under half of what shuffled runs measured.
THRESHOLD = 0.25


def write_class_tree(root: Path, per_class: int, seed: int) -> None:
    for label, (colour, shape) in enumerate(CLASSES):
        folder = root / f"{colour}_{shape}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            render(random_scene(rng, [(colour, shape)]), 64, rng).save(folder / f"{i:04d}.jpg", quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The training tree and a held-out zero-shot tree of the same classes, shards of the training tree
    in both orders (one shard each, as make-shards' default size writes it) and a tokenizer."""
    root = tmp_path_factory.mktemp("class_tree")
    write_class_tree(root / "train", PER_CLASS, seed=0)
    write_class_tree(root / "eval", EVAL_PER_CLASS, seed=1)
    (root / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in sorted(CLASSES)))
    (root / "templates.txt").write_text("a photo of a {}.\n")
    for name, order in (("shuffled", []), ("class_order", ["--no-shuffle"])):
        assert main(["make-shards", "--class-folders", str(root / "train"), "--templates", "a photo of a {}.",
                     "--out", str(root / name), "--workers", "2", "--no-progress", *order]) == 0
    assert main(["train-tokenizer", "--shards", str(root / "shuffled" / "00000.tar"), "--out", str(root / "tok"),
                 "--vocab-size", "64"]) == 0
    return root


def recipe_args(tree: Path, shards: str, out: Path, samples: int, *overrides: str) -> list[str]:
    return ["train", "--config", "configs/tiny_cpu.yaml", f"output_dir={out}",
            f"data.train=[{{shards: '{tree / shards / '00000.tar'}'}}]", f"data.tokenizer={tree / 'tok.model'}",
            "data.workers=1", f"data.sample_shuffle={BUFFER}", "model.activation_checkpointing=false",
            "train.global_batch=32", "optim.base_lr=4e-3",
            f"phases=[{{name: masked, samples: {samples}, mask_ratio: 0.5, warmup_samples: 128}}]",
            "checkpoint.every_samples=0", *overrides]


def test_class_ordered_tree_through_make_shards_trains_well_above_chance(tree, tmp_path):
    out = tmp_path / "run"
    zero_shot = (f"{{name: classes, kind: zero_shot, path: {tree / 'eval'}, classnames: {tree / 'classnames.txt'}, "
                 f"templates: {tree / 'templates.txt'}, workers: 0}}")
    done = subprocess.run([sys.executable, "-m", "flip_ds",
                           *recipe_args(tree, "shuffled", out, SAMPLES, "logging.every_steps=8", "eval.at_end=true",
                                        f"eval.sets=[{zero_shot}]")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    top1 = scalars(out / "tensorboard", "eval/classes/top1")[SAMPLES]
    assert top1 >= THRESHOLD, f"zero-shot top-1 {top1:.3f} is not well above chance {CHANCE:.2f}"
    # Shuffled: no batch is dominated by one caption; a batch's most common class is about a fifth of it
    assert set(scalars(out / "tensorboard", "data/duplicate_dominated_batches").values()) == {0.0}
    assert max(scalars(out / "tensorboard", "data/duplicate_caption_share").values()) < 0.35
    assert "warning: in" not in done.stderr


def test_unshuffled_class_ordered_shards_warn_once_and_count_in_tensorboard(tree, tmp_path):
    """The report's run in small: 2 ranks, both reading the one class-ordered shard block by block."""
    out = tmp_path / "run"
    done = torchrun(recipe_args(tree, "class_order", out, 256, "train.micro_batch=16", "logging.every_steps=4",
                                "eval.sets=[]"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tb = out / "tensorboard"
    # 2 windows of 4 steps x 2 ranks: every 16-row batch is one class, so one caption
    assert scalars(tb, "data/duplicate_dominated_batches") == {128: 1.0, 256: 1.0}
    assert scalars(tb, "data/duplicate_caption_share") == {128: 1.0, 256: 1.0}
    warnings = [line for line in done.stderr.splitlines() if "warning: in" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "in 100% of the last 8 batches (all ranks) more than half the rows share one caption" in warnings[0]
    assert "flip-ds make-shards" in warnings[0]
    # What the warning is about: each global batch is one caption, so every image scores the same
    # against all captions and the loss cannot fall below ln(32), chance among 32
    assert min(scalars(tb, "train/loss").values()) >= math.log(32) - 1e-3


def test_caption_repeats_counts_batches_dominated_by_one_caption():
    def batch(*groups: int) -> torch.Tensor:  # rows of distinct captions, `n` rows for each group
        rows = [torch.full((n, 6), k) for k, n in enumerate(groups)]
        return torch.cat(rows)

    repeats = CaptionRepeats()
    repeats.observe(batch(5, 1, 1, 1))  # 5 of 8 rows: more than half, dominated
    repeats.observe(batch(4, 4))  # exactly half: not
    repeats.observe(batch(7))  # under 8 rows: not checked
    repeats.observe(batch(*[1] * 10))  # all distinct
    window = repeats.take()
    assert window == [3.0, 1.0, 5.0 + 4.0 + 1.0, 26.0]
    assert CaptionRepeats.scalars(window) == {"data/duplicate_dominated_batches": 1 / 3,
                                              "data/duplicate_caption_share": 10 / 26}
    assert repeats.take() == [0.0, 0.0, 0.0, 0.0]  # a new window
    assert CaptionRepeats.scalars([0.0] * 4) == {}
    # 1 of 10 dominated is no warning (a shuffled few-class set gets that by chance); 1 of 3 is, once
    assert repeats.warning([10.0, 1.0, 20.0, 80.0]) is None
    assert "33% of the last 3 batches" in repeats.warning(window)
    assert repeats.warning(window) is None
