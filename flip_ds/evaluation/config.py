"""The eval section of a recipe: which sets to evaluate during training, and how often."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flip_ds.config_loader import check
from flip_ds.evaluation.karpathy import SPLITS


@dataclass
class EvalSet:
    name: str
    kind: Literal["zero_shot", "retrieval"]
    path: str  # zero_shot: an ImageNet-style folder; retrieval: shards or a CSV/JSON/JSONL captions file
    classnames: str = ""  # zero_shot: 'imagenet1k', a text file of one class name per line, or "" (folder names)
    templates: str = "clip_short"  # zero_shot: 'clip80', 'clip_short' or a text file of templates with {}
    image_root: str = ""  # retrieval files: where relative image paths start ("" = the file's folder)
    split: str = ""  # retrieval, Karpathy-split JSON only: test, val, train or restval ("" = test)
    batch_size: int = 256
    workers: int = 2  # image-decoding processes per rank

    def validate(self, prefix: str = "eval_set") -> None:
        check(self.name.strip() != "", f"{prefix}.name: must not be empty")
        check(self.path.strip() != "", f"{prefix}.path: must not be empty")
        check(self.batch_size > 0, f"{prefix}.batch_size: {self.batch_size} must be > 0")
        check(self.workers >= 0, f"{prefix}.workers: {self.workers} must be >= 0")
        check(self.split in ("", *SPLITS), f"{prefix}.split: {self.split!r} is not one of {', '.join(SPLITS)}")
        check(not self.split or self.kind == "retrieval", f"{prefix}.split: only retrieval sets have a split")


@dataclass
class EvalConfig:
    every_samples: int = 0  # 0: no in-training evaluation
    at_end: bool = True  # evaluate once more when the last phase finishes
    sets: list[EvalSet] = field(default_factory=list)

    def validate(self, prefix: str = "eval") -> None:
        check(self.every_samples >= 0, f"{prefix}.every_samples: {self.every_samples} must be >= 0")
        names = [s.name for s in self.sets]
        check(len(names) == len(set(names)), f"{prefix}.sets: names must be unique, got {names}")
