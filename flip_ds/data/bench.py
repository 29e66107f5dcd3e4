"""Throughput of the training data pipeline alone: one reader in-process, then the full DataLoader."""

from __future__ import annotations

import time
from collections import Counter

from flip_ds.data.config import DataConfig, DataSource
from flip_ds.data.pipeline import TrainStream
from flip_ds.data.worker import WorkerStream


def bench_data(shards: str, tokenizer: str, workers: int = 2, batch_size: int = 64, seconds: float = 20.0,
               image_size: int = 224, context_length: int = 32, seed: int = 0) -> dict:
    """Samples/s of (1) one reader stream decoding in this process, for seconds / 2: the throughput of one
    worker on one core; (2) the TrainStream with `workers` DataLoader workers for `seconds`, after its
    first batch: the total a rank gets, and each worker's share."""
    cfg = DataConfig(train=[DataSource(shards)], tokenizer=tokenizer, workers=workers)
    stream = TrainStream(cfg, tokenizer_file=tokenizer, context_length=context_length, image_size=image_size,
                         batch_size=batch_size, seed=seed, rank=0, world_size=1)

    single = iter(WorkerStream(stream.settings, 0, None))
    next(single)  # opening shards and loading the tokenizer is not throughput
    start, samples = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 2:
        batch, _, _ = next(single)
        samples += len(batch.keys) if batch is not None else 0
    single_rate = samples / (time.perf_counter() - start)

    batches = iter(stream)
    next(batches)  # worker start-up is not throughput
    per_worker: Counter[int] = Counter()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        per_worker[batch.worker] += len(batch.keys)
    elapsed = time.perf_counter() - start
    counts = stream.skip_counts()
    stream.close()
    total = sum(per_worker.values())
    return {"shards": shards, "workers": workers, "batch_size": batch_size, "image_size": image_size,
            "seconds": round(elapsed, 2), "samples": total, "samples_per_s": total / elapsed,
            "per_worker_samples_per_s": {str(w): n / elapsed for w, n in sorted(per_worker.items())},
            "single_worker_samples_per_s": single_rate,
            "skipped": {k: v for k, v in counts.items() if v and k != "samples_read"}}
