"""Throughput of the training data pipeline alone: one reader in-process, then the full DataLoader."""

from __future__ import annotations

import math
import time
from collections import Counter

import torch

from flip_ds.data.config import DataConfig, DataSource
from flip_ds.data.pipeline import TrainStream
from flip_ds.data.worker import WorkerStream


def bench_data(shards: str, tokenizer: str, workers: int = 2, batch_size: int = 64, seconds: float = 20.0,
               image_size: int = 224, context_length: int = 32, seed: int = 0) -> dict:
    """Samples/s of (1) one reader stream decoding in this process, for seconds / 2: the throughput of one
    worker on one core (also per CPU-second of this process, which other load on the machine does not
    change); (2) the TrainStream with `workers` DataLoader workers for `seconds`, after its
    first batch: the total a rank gets, and each worker's share."""
    cfg = DataConfig(train=[DataSource(shards)], tokenizer=tokenizer, workers=workers)
    stream = TrainStream(cfg, tokenizer_file=tokenizer, context_length=context_length, image_size=image_size,
                         batch_size=batch_size, seed=seed, rank=0, world_size=1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    single = iter(WorkerStream(stream.settings, 0, None))
    next(single)  # opening shards and loading the tokenizer is not throughput
    start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds / 2:
        batch, _, _ = next(single)
        samples += len(batch.keys) if batch is not None else 0
    single_rate = samples / (time.perf_counter() - start)
    single_cpu_rate = samples / (time.process_time() - cpu_start)  # unaffected by other load on the machine
    torch.set_num_threads(threads)

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
            "single_worker_samples_per_s": single_rate, "single_worker_samples_per_cpu_s": single_cpu_rate,
            "skipped": {k: v for k, v in counts.items() if v and k != "samples_read"}}


def feeding(recipe_path: str, gpus: int, gpu_mem_gib: float, samples_per_cpu_s: float) -> dict:
    """Loader cores per GPU that keep `recipe_path` on `gpus` GPUs fed, at the planner's fast end
    (its highest samples/s per GPU, in the phase that needs the most), given one loader core's
    measured samples per CPU-second."""
    from flip_ds.config import load_recipe
    from flip_ds.cost import Setting
    from flip_ds.plan import Cluster, plan, vocab_size_of

    recipe = load_recipe(recipe_path)
    p = plan(recipe, Cluster(gpus=gpus, gpu_mem_gib=gpu_mem_gib), Setting(), vocab_size_of(recipe, 32000))
    rates = {ph.name: ph.steps * recipe.train.global_batch / (ph.hours[1] * 3600) / gpus for ph in p.clock.phases}
    phase = max(rates, key=rates.get)
    cores = rates[phase] / samples_per_cpu_s
    return {"recipe": recipe_path, "gpus": gpus, "phase": phase, "samples_per_s_per_gpu": rates[phase],
            "loader_cores_per_gpu": cores, "cpus_per_task": math.ceil(cores) + 1}
