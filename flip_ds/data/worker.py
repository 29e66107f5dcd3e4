"""One reader stream (a rank's DataLoader worker): shards to augmented, tokenised batches, resumably.

The stream works in blocks. A block reads up to `sample_shuffle` raw samples (bytes, no decoding)
from `shard_shuffle` open shards, picking the shard of each read at random; then it emits the block
in a random order, decoding and augmenting each sample with its own seed. Every random choice comes
from rng(seed, rank, worker, block), so a position is just (block, samples emitted from it, each open
shard's draw number and offset at the block's start) plus the skip counts: a resumed worker reopens
its shards at those offsets, re-reads one block without decoding it, and goes on exactly where it was.

Each item the stream yields carries the position *after* it, so whoever consumed the item can resume
right behind it. Items are batches, or (only while bad data keeps a block from completing a batch)
progress items without a batch, which carry the live skip counts so the skip-rate limit can fire.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flip_ds.data.faults import SkipStats
from flip_ds.data.reader import ShardReader, Skip, parse_sample
from flip_ds.data.shards import BLOCK, ShardPlan, stream_rng
from flip_ds.data.tokenizer import Tokenizer
from flip_ds.data.transforms import TrainAugment, to_planar


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8: the trainer normalises them on its device
    tokens: torch.Tensor  # (B, context_length) int64
    keys: list[str] = field(default_factory=list)  # 'shard url#sample key' of each row, for tracing
    worker: int = 0  # the reader stream (DataLoader worker) that assembled it

    def pin_memory(self) -> Batch:  # called by DataLoader's pin-memory thread when CUDA is present
        return Batch(self.images.pin_memory(), self.tokens.pin_memory(), self.keys, self.worker)


@dataclass
class StreamSettings:
    """What a stream needs, picklable, so it crosses into DataLoader workers."""

    plan: ShardPlan
    seed: int
    rank: int
    world_size: int
    workers: int  # reader streams on this rank (DataLoader workers, at least 1)
    batch_size: int
    image_size: int
    context_length: int
    tokenizer_file: str
    open_shards: int
    block_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: bool


def initial_position() -> dict[str, Any]:
    return {"block": 0, "emitted": 0, "slots": None, "next_draw": 0, "stats": SkipStats().state(),
            "batch_in_block": False, "progress_through": -1}


class WorkerStream:
    """Items (batch or None, position after it, live skip stats) of stream (rank, worker)."""

    def __init__(self, s: StreamSettings, worker: int, position: dict[str, Any] | None) -> None:
        self.s, self.worker = s, worker
        self.shards = s.plan.stream(s.rank, s.world_size, worker, s.workers)
        self.augment = TrainAugment(s.image_size, s.crop_scale, s.crop_ratio, s.hflip)
        self.resume = dict(position or initial_position())
        self.stats = SkipStats.from_state(self.resume["stats"])
        # Per open shard: [draw number, samples read] (or None while empty), and its reader.
        # A stream with fewer shards than open_shards would open one shard twice at once.
        open_shards = min(s.open_shards, self.shards.size)
        self.slots: list[list[int] | None] = [list(x) if x else None for x in self.resume["slots"]
                                              or [None] * open_shards]
        self.readers: list[ShardReader | None] = [None] * len(self.slots)
        self.next_draw = self.resume["next_draw"]
        self.block_pass = 0

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, Any], dict[str, Any]]]:
        s = self.s
        tokenizer = Tokenizer(s.tokenizer_file, s.context_length)
        self._reopen()
        block, first = self.resume["block"], self.resume["emitted"]
        batch_in_block, progress_through = self.resume["batch_in_block"], self.resume["progress_through"]
        pending: list[tuple[np.ndarray, str, str]] = []
        last = self.resume  # the position after the last batch, where a resume would restart
        while True:
            start = {"slots": [list(x) if x else None for x in self.slots], "next_draw": self.next_draw}
            rng = stream_rng(s.seed, BLOCK, s.rank, self.worker, block)
            raws = self._read_block(rng)
            if first:  # a resumed block: its reads were counted before the position was taken
                self.stats = SkipStats.from_state(last["stats"])
            order = rng.permutation(len(raws))
            seeds = rng.integers(2**63 - 1, size=len(raws))
            for pos in range(first, len(raws)):
                raw = raws[order[pos]]
                try:
                    sample = parse_sample(raw)
                    image = self.augment(self.augment.decode(sample.image), int(seeds[order[pos]]))
                except Skip as skip:
                    self.stats.skip(skip.cause, raw["__url__"])
                    continue
                pending.append((image, sample.caption, f"{sample.url}#{sample.key}"))
                if len(pending) == s.batch_size:
                    batch_in_block = True
                    last = {**start, "block": block, "emitted": pos + 1, "stats": self.stats.state(),
                            "batch_in_block": True, "progress_through": progress_through}
                    yield self._batch(pending, tokenizer), last, last["stats"]
                    pending = []
            if not batch_in_block and block > progress_through:
                # No batch in a whole block: tell the main process how bad it is, resumable behind it.
                progress_through = block
                last = {**last, "progress_through": block}
                yield None, last, self.stats.state()
            block, first, batch_in_block = block + 1, 0, False

    def _batch(self, pending: list[tuple[np.ndarray, str, str]], tokenizer: Tokenizer) -> Batch:
        images = to_planar([p[0] for p in pending])
        tokens = torch.from_numpy(tokenizer([p[1] for p in pending]))
        return Batch(images, tokens, [p[2] for p in pending], self.worker)

    def _reopen(self) -> None:
        """Open the shards of the resume position and skip what they had already given (no decoding)."""
        for k, slot in enumerate(self.slots):
            if slot is not None:
                reader = self.readers[k] = ShardReader(self.shards.url(slot[0]))
                for _ in range(slot[1]):
                    if next(reader, None) is None:
                        break

    def _read_block(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Up to block_size raw samples; every read, successful or not, uses one of block_size attempts,
        so a block ends even when every shard is missing. A block holds samples of one pass only (a
        fixed list's pass ends a block), so no sample can come twice within a pass."""
        picks = rng.integers(len(self.slots), size=self.s.block_size)
        opened = [slot[0] for slot in self.slots if slot is not None]
        self.block_pass = self.shards.pass_of(min(opened, default=self.next_draw))
        raws = []
        for k in picks:
            raw = self._read_one(int(k))
            if raw is not None:
                raws.append(raw)
            elif self._pass_done():
                break
        return raws

    def _pass_done(self) -> bool:
        return all(slot is None for slot in self.slots) and self.shards.pass_of(self.next_draw) != self.block_pass

    def _read_one(self, k: int) -> dict[str, Any] | None:
        if self.slots[k] is None:
            if self.shards.pass_of(self.next_draw) != self.block_pass:
                return None  # the next pass waits for the next block
            self.slots[k] = [self.next_draw, 0]
            self.readers[k] = ShardReader(self.shards.url(self.next_draw))
            self.next_draw += 1
        reader = self.readers[k]
        raw = next(reader, None)
        if raw is None:  # this shard is done: count its fault, if any; the slot draws a new one next time
            if reader.fault:
                self.stats.skip(reader.fault, reader.url)
            self.slots[k] = self.readers[k] = None
            return None
        self.slots[k][1] += 1
        self.stats.read()
        return raw
