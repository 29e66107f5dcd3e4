"""The training stream of one rank: DataLoader workers assembling batches, exactly resumable.

Each DataLoader worker runs one reader stream (worker.py) and yields whole batches together with its
position after each. DataLoader hands out its workers' items in turn, so the main process knows, for
the last batch the consumer took, every worker's position and whose turn is next: that is the
state. A resumed DataLoader starts its turns at that worker (worker ids are rotated), which makes
the resumed batches equal to the uninterrupted ones even when the count so far is not a multiple
of the number of workers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flip_ds.config_loader import ConfigError, check
from flip_ds.data.config import DataConfig
from flip_ds.data.faults import DataError, LoaderStalled, SkipStats
from flip_ds.data.shards import ShardPlan
from flip_ds.data.tokenizer import Tokenizer
from flip_ds.data.worker import Batch, StreamSettings, WorkerStream

__all__ = ["Batch", "DataError", "LoaderStalled", "TrainStream"]
STATE_VERSION = 1


class _WorkerItems(IterableDataset):
    """In DataLoader worker i: the items of reader stream (i + first) mod workers."""

    def __init__(self, settings: StreamSettings, positions: list[dict | None], first: int) -> None:
        self.settings, self.positions, self.first = settings, positions, first

    def __iter__(self) -> Iterator[tuple[Batch | None, int, dict, dict]]:
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.first) % self.settings.workers
        for batch, position, stats in WorkerStream(self.settings, stream, self.positions[stream]):
            yield batch, stream, position, stats


class TrainStream:
    """Infinite, resampled, exactly resumable stream of training batches for one rank."""

    def __init__(self, cfg: DataConfig, *, tokenizer_file: str, context_length: int, image_size: int,
                 batch_size: int, seed: int, rank: int, world_size: int, state: dict | None = None) -> None:
        check(cfg.workers is not None, "data.workers: decide it first (DataConfig.with_workers)")
        self.cfg, self.rank, self.seed = cfg, rank, seed
        streams = max(cfg.workers, 1)
        plan = ShardPlan.from_config(cfg, seed)
        for worker in range(streams):  # a fixed list too short to split fails now, not in a worker
            plan.stream(rank, world_size, worker, streams)
        Tokenizer(tokenizer_file, context_length)  # a bad tokenizer file fails here, not in every worker
        self.settings = StreamSettings(
            plan=plan, seed=seed, rank=rank, world_size=world_size, workers=streams, batch_size=batch_size,
            image_size=image_size, context_length=context_length, tokenizer_file=tokenizer_file,
            open_shards=cfg.shard_shuffle, block_size=cfg.sample_shuffle, crop_scale=tuple(cfg.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip)
        self.positions: list[dict | None] = [None] * streams
        self.next_stream = 0
        if state is not None:
            self._load(state, world_size)
        self.stats = [SkipStats.from_state(p["stats"]) if p else SkipStats() for p in self.positions]
        self._items: Iterator | None = None
        self._batches: Iterator[Batch] | None = None

    def _load(self, state: dict, world_size: int) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        saved = (state["rank"], state["world_size"], state["workers"])
        if saved != (self.rank, world_size, self.settings.workers):
            raise ConfigError(f"data state was saved by rank {saved[0]} of {saved[1]} with data.workers={saved[2]}; "
                              f"this is rank {self.rank} of {world_size} with {self.settings.workers} reader(s) "
                              f"per rank: resume with the same world size and data.workers for an exact resume")
        self.positions = copy.deepcopy(state["positions"])
        self.next_stream = state["next_stream"]

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position (a second iter() resumes behind the last batch taken)."""
        self.close()
        dataset = _WorkerItems(self.settings, copy.deepcopy(self.positions), self.next_stream)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers,
                            pin_memory=torch.cuda.is_available(),
                            timeout=self.cfg.timeout_s if self.cfg.workers else 0,
                            # DataLoader draws its base seed from this, not from the global generator
                            generator=torch.Generator().manual_seed(self.seed))
        self._items = iter(loader)
        self._batches = self._take(self._items)
        return self._batches

    def _take(self, items: Iterator) -> Iterator[Batch]:
        for batch, stream, position, stats in self._within_timeout(items):
            self.positions[stream] = position
            self.stats[stream] = SkipStats.from_state(stats)
            self.next_stream = (stream + 1) % self.settings.workers
            if batch is None:
                # A worker is reading only bad data; without this check the rank would wait forever.
                self.check_skip_rate()
                continue
            yield batch

    def _within_timeout(self, items: Iterator) -> Iterator:
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise LoaderStalled(f"data on rank {self.rank}: a loader worker delivered nothing for "
                                    f"{self.cfg.timeout_s:g} s (data.timeout_s); a shard read is hanging "
                                    f"(file system?)") from None
            yield item

    def state_dict(self) -> dict:
        """The position after the last batch the consumer took; small and picklable."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.settings.world_size,
                "workers": self.settings.workers, "next_stream": self.next_stream,
                "positions": copy.deepcopy(self.positions)}

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples and shard faults by cause on this rank since the run began, and 'samples_read'."""
        return dict(SkipStats.merged(self.stats).counts)

    def check_skip_rate(self) -> None:
        """Raise DataError naming the worst shard when more than data.max_skip_rate of reads were skipped."""
        SkipStats.merged(self.stats).check(self.cfg.max_skip_rate, self.cfg.skip_rate_min_samples,
                                           f"data on rank {self.rank}")

    def close(self) -> None:
        """Stop the workers (a later iter() starts new ones at the current position)."""
        if self._batches is not None:
            self._batches.close()
        self._batches = self._items = None  # the last reference: DataLoader shuts its workers down
