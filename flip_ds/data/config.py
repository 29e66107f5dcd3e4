"""The data section of a recipe: where training shards live and how samples become tensors."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from flip_ds.config_loader import check


@dataclass
class DataSource:
    shards: str  # brace spec in img2dataset's layout, e.g. /data/laion400m/{00000..41407}.tar
    weight: float = 1.0  # relative sampling weight when several sources are joined


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    tokenizer: str = ""  # SentencePiece .model file (flip-ds train-tokenizer makes one)
    workers: int | None = None  # loader processes per rank; None: this rank's CPUs less one (default_workers)
    resample: bool = True  # draw shards with replacement, forever (LAION-style); false: a fixed list in passes
    # Shards open at once per worker, samples drawn from them at random. A resumed worker re-reads
    # (without decoding) the consumed part of each, so more mixing costs a slower resume.
    shard_shuffle: int = 8
    sample_shuffle: int = 1000  # samples read per shuffled block per worker (a resume re-reads one block)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # FLIP's RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    max_skip_rate: float = 0.1  # stop when more than this share of samples was skipped ...
    skip_rate_min_samples: int = 10000  # ... once at least this many were read on a rank
    # A loader worker that hands over nothing for this long (a read hung on the file system) stops
    # the rank with an error that is not a data error: the SLURM template requeues the job
    timeout_s: float = 600.0

    def validate(self, prefix: str = "data") -> None:
        for i, src in enumerate(self.train):
            check(src.shards.strip() != "", f"{prefix}.train.{i}.shards: empty shard spec")
            check(src.weight > 0, f"{prefix}.train.{i}.weight: {src.weight} must be > 0")
        check(self.workers is None or self.workers >= 0, f"{prefix}.workers: {self.workers} must be >= 0")
        check(self.timeout_s > 0, f"{prefix}.timeout_s: {self.timeout_s} must be > 0")
        check(self.shard_shuffle >= 1, f"{prefix}.shard_shuffle: {self.shard_shuffle} must be >= 1")
        check(self.sample_shuffle >= 1, f"{prefix}.sample_shuffle: {self.sample_shuffle} must be >= 1")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"{prefix}.crop_scale: {self.crop_scale} must satisfy 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        check(0 < lo <= hi, f"{prefix}.crop_ratio: {self.crop_ratio} must satisfy 0 < min <= max")
        check(0.0 <= self.max_skip_rate <= 1.0, f"{prefix}.max_skip_rate: {self.max_skip_rate} is outside [0, 1]")
        check(self.skip_rate_min_samples >= 0,
              f"{prefix}.skip_rate_min_samples: {self.skip_rate_min_samples} must be >= 0")

    def with_workers(self, local_world_size: int) -> DataConfig:
        """This config with `workers` decided: the recipe's, or default_workers()."""
        if self.workers is not None:
            return self
        return dataclasses.replace(self, workers=default_workers(local_world_size))


def default_workers(local_world_size: int) -> int:
    """Loader processes for one rank: the CPUs it may use, less one for the training process itself.

    Those CPUs are its affinity when the launcher binds it (srun with --cpus-per-task, numactl),
    else its share of the node's CPUs.
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bound = allowed < (os.cpu_count() or allowed)
    per_rank = allowed if bound else allowed // max(local_world_size, 1)
    return max(1, per_rank - 1)
