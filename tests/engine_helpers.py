"""Building real DeepSpeed engines for the tiny model inside test processes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flip_ds.config import load_recipe

# ZeRO-3 where even the tiny model's small parameters are partitioned and re-gathered
# (the default persistence threshold would keep all of them resident and hide bugs).
ZERO3_PARTITION_ALL = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                             "memory_efficient_linear": False, "stage3_max_live_parameters": 1e6,
                                             "stage3_prefetch_bucket_size": 1e5}}


def write_json(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def tiny_recipe(tmp: Path, *overrides: str, zero: dict | None = None):
    tmp.mkdir(parents=True, exist_ok=True)
    ds = write_json(tmp / "ds.json", zero or ZERO3_PARTITION_ALL)
    return load_recipe("configs/tiny_cpu.yaml", [f"train.deepspeed={ds}", f"output_dir={tmp / 'run'}", *overrides])


def synthetic_batches(rank: int, k: int, micro: int, vocab: int = 100, size: int = 64):
    """k micro batches of this rank, the same for the same (rank, k, micro)."""
    g = torch.Generator().manual_seed(1000 + rank)
    images = torch.randn(k * micro, 3, size, size, generator=g)
    tokens = torch.randint(4, vocab, (k * micro, 12), generator=g)
    tokens[:, 0], tokens[:, -1] = 2, 3
    return [(images[j * micro:(j + 1) * micro], tokens[j * micro:(j + 1) * micro]) for j in range(k)]
