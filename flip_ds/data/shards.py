"""Shard lists: spec expansion, the start-up check, and each reader stream's deterministic shard draws.

A stream is one (rank, worker) pair. Its n-th shard is a pure function of (seed, rank, worker, n),
so a resumed worker needs only its draw counter, not the history of what it read.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import numpy as np
from webdataset.shardlists import expand_urls

from flip_ds.config_loader import ConfigError
from flip_ds.data.config import DataConfig

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")  # pipe:, http:, s3:, ...; 'file:' is local
_GLOB = re.compile(r"[*?\[]")
# Distinct first words keep the random streams of different purposes apart.
DRAW, PASS, ORDER, BLOCK = 1, 2, 3, 4


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, *key): nothing to save, everything reproducible."""
    return np.random.default_rng([seed % 2**64, *key])


def local_path(url: str) -> str | None:
    """The file path of a local shard url, None for remote ones (pipe:, http:, s3:, ...)."""
    match = _SCHEME.match(url)
    if match is None:
        return url
    return url[len("file:"):] if match.group(1) == "file" else None


def expand_spec(spec: str) -> list[str]:
    """webdataset's expansion ('a::b' joins, {00000..00099} braces), then glob patterns of local paths."""
    urls: list[str] = []
    for url in expand_urls(spec):
        path = local_path(url)
        urls.extend(sorted(glob.glob(path)) if path is not None and _GLOB.search(path) else [url])
    return urls


def list_shards(spec: str) -> list[str]:
    """The shards of one spec; a spec matching no file at all is a ConfigError naming it.

    Listed files that are missing are kept: reading them counts a `missing_shard` each time, so a
    partly synced dataset trains and says so. Remote urls cannot be checked here.
    """
    urls = expand_spec(spec)
    local = [local_path(u) for u in urls]
    if not urls or (all(p is not None for p in local) and not any(os.path.isfile(p) for p in local)):
        raise ConfigError(f"data.train: shard spec '{spec}' matches no file")
    return urls


@dataclass
class ShardPlan:
    """All training shards, grouped by source, and how streams draw from them."""

    sources: list[list[str]]
    weights: list[float]
    resample: bool
    seed: int

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int) -> ShardPlan:
        if not cfg.train:
            raise ConfigError("data.train: no training shards; add e.g. [{shards: /data/laion/{00000..41407}.tar}]")
        if not cfg.resample and len({s.weight for s in cfg.train}) > 1:
            raise ConfigError("data.train: source weights only apply with data.resample=true; a fixed list reads "
                              "every shard once per pass")
        return cls([list_shards(s.shards) for s in cfg.train], [s.weight for s in cfg.train], cfg.resample, seed)

    def stream(self, rank: int, world_size: int, worker: int, workers: int) -> ResampledShards | FixedShards:
        if self.resample:
            return ResampledShards(self, rank, worker)
        return FixedShards(self, rank, world_size, worker, workers)


class ResampledShards:
    """Draw n: a source by weight, then one of its shards uniformly, from rng(seed, rank, worker, n)."""

    def __init__(self, plan: ShardPlan, rank: int, worker: int) -> None:
        self.plan, self.rank, self.worker = plan, rank, worker
        self.size = sum(len(source) for source in plan.sources)
        weights = np.asarray(plan.weights, dtype=np.float64)
        self.p = weights / weights.sum()

    def pass_of(self, draw: int) -> int:
        return 0  # resampling has no passes

    def url(self, draw: int) -> str:
        rng = stream_rng(self.plan.seed, DRAW, self.rank, self.worker, draw)
        source = self.plan.sources[int(rng.choice(len(self.p), p=self.p))]
        return source[int(rng.integers(len(source)))]


class FixedShards:
    """A fixed list split by rank, then by worker (disjoint streams), read in a fresh order each pass."""

    def __init__(self, plan: ShardPlan, rank: int, world_size: int, worker: int, workers: int) -> None:
        shards = [url for source in plan.sources for url in source]
        order = stream_rng(plan.seed, ORDER).permutation(len(shards))  # the same on every rank
        self.mine = [shards[i] for i in order[rank::world_size][worker::workers]]
        if not self.mine:
            raise ConfigError(f"data.train: {len(shards)} shard(s) cannot feed {world_size} rank(s) x {workers} "
                              "worker(s) without resampling; set data.resample=true or use fewer workers")
        self.size = len(self.mine)
        self.seed, self.key = plan.seed, (rank, worker)
        self._pass, self._order = -1, np.arange(0)

    def pass_of(self, draw: int) -> int:
        return draw // len(self.mine)

    def url(self, draw: int) -> str:
        n = len(self.mine)
        if draw // n != self._pass:
            self._pass = draw // n
            self._order = stream_rng(self.seed, PASS, *self.key, self._pass).permutation(n)
        return self.mine[self._order[draw % n]]
