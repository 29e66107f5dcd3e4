"""Encode a dataset in batches, sharded over the ranks of a launcher, and gather the features.

Batch b holds items [b*B, (b+1)*B); rank r encodes batches r, r+W, r+2W, ... So a batch has the
same content whatever the world size, which makes the features (and the numbers computed from
them) the same on 1 process or W; masking noise is seeded by the batch index for the same
reason. Every rank makes the same number of forward calls (ranks short of a batch encode a
dummy one), because under ZeRO-3 each forward is a collective that gathers the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flip_ds import distributed
from flip_ds.evaluation.datasets import ImageDataset

EncodeFn = Callable[[torch.Tensor, int], torch.Tensor]  # (inputs on device, batch index) -> (n, D)


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    @staticmethod
    def current() -> Shard:
        return Shard(distributed.rank(), distributed.world_size())


class ImageSource:
    """Images decoded by `workers` loader processes; validity flags mark unreadable files."""

    def __init__(self, dataset: ImageDataset, workers: int) -> None:
        self.dataset = dataset
        self.workers = workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_ids: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not batch_ids:
            return iter(())
        index_lists = [list(range(b * batch_size, min((b + 1) * batch_size, len(self)))) for b in batch_ids]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_lists,
                                             num_workers=min(self.workers, len(index_lists)))
        return iter(loader)

    def dummy(self) -> torch.Tensor:
        size = self.dataset.image_size
        return torch.zeros(1, 3, size, size)


class TokenSource:
    """Token rows already in memory (prompts, captions): always valid."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, batch_ids: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in batch_ids:
            rows = self.tokens[b * batch_size:(b + 1) * batch_size]
            yield rows, torch.ones(len(rows), dtype=torch.bool)

    def dummy(self) -> torch.Tensor:
        return self.tokens[:1]


def encode_all(source: ImageSource | TokenSource, encode: EncodeFn, batch_size: int,
               device: torch.device, desc: str, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on the CPU, valid (N,) bool), in item order, on every rank."""
    shard = Shard.current()
    n = len(source)
    n_batches = math.ceil(n / batch_size)
    steps = math.ceil(n_batches / shard.world)
    mine = list(range(shard.rank, n_batches, shard.world))
    feats: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    with torch.no_grad(), tqdm(total=steps, desc=desc, unit="batch", disable=not progress or shard.rank != 0,
                               leave=False) as bar:
        for b, (inputs, ok) in zip(mine, source.batches(mine, batch_size), strict=True):
            out = encode(inputs.to(device), b).float()
            feats.append(_pad_rows(out, batch_size))
            valid.append(_pad_rows(ok.to(device=device, dtype=torch.uint8), batch_size))
            bar.update()
        for _ in range(steps - len(mine)):
            out = encode(source.dummy().to(device), -1).float()
            feats.append(torch.zeros(batch_size, out.shape[1], device=device))
            valid.append(torch.zeros(batch_size, dtype=torch.uint8, device=device))
            bar.update()
    local_feats = torch.stack(feats)  # (steps, B, D)
    local_valid = torch.stack(valid)
    if shard.world > 1:
        local_feats = _gather_interleaved(local_feats)
        local_valid = _gather_interleaved(local_valid)
    return local_feats.reshape(-1, local_feats.shape[-1])[:n].cpu(), local_valid.reshape(-1)[:n].bool().cpu()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _gather_interleaved(local: torch.Tensor) -> torch.Tensor:
    """(steps, B, ...) per rank -> (steps * W, B, ...) in global batch order: step s of rank r is batch s*W + r."""
    return torch.stack(distributed.all_gather(local), dim=1).reshape(-1, *local.shape[1:])


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def image_encoder(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, mask_ratio: float = 0.0,
                  seed: int = 0, tower_only: bool = False) -> EncodeFn:
    """Normalised image embeddings (or the tower's pooled features with `tower_only`).

    With `mask_ratio` > 0 the mask of batch b is drawn from a generator seeded with seed + b.
    """

    def encode(images: torch.Tensor, batch: int) -> torch.Tensor:
        generator = None
        if mask_ratio > 0.0:
            generator = torch.Generator(device=device).manual_seed(seed + max(batch, 0))
        with _autocast(device, dtype):
            if tower_only:
                return model.visual(images.to(model.visual_proj.weight.dtype), mask_ratio, generator)
            return model.encode_image(images, mask_ratio, generator)

    return encode


def text_encoder(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> EncodeFn:
    def encode(tokens: torch.Tensor, batch: int) -> torch.Tensor:
        with _autocast(device, dtype):
            return model.encode_text(tokens)

    return encode
