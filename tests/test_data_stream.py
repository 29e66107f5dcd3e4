"""The training stream on real webdataset shards: determinism, rank/worker splits, exact resume."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import time

import pytest
import torch
from torchvision.transforms import Normalize

from flip_ds.config_loader import ConfigError
from flip_ds.data.config import DataConfig, DataSource, default_workers
from flip_ds.data.pipeline import DataError, LoaderStalled, TrainStream
from flip_ds.data.shards import ShardPlan, list_shards
from flip_ds.data.transforms import CLIP_MEAN, CLIP_STD, denormalize, normalize


def make_stream(demo, *, rank=0, world_size=1, seed=0, batch_size=8, state=None, **data) -> TrainStream:
    cfg = DataConfig(train=[DataSource(demo.train)], tokenizer=demo.tokenizer, **{"workers": 2, **data})
    return TrainStream(cfg, tokenizer_file=demo.tokenizer, context_length=16, image_size=32, batch_size=batch_size,
                       seed=seed, rank=rank, world_size=world_size, state=state)


def take(stream: TrainStream, n: int, close: bool = True) -> list:
    it = iter(stream)
    batches = [next(it) for _ in range(n)]
    if close:
        stream.close()
    return batches


def same(a, b) -> bool:
    return a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


def test_batches_are_normalised_images_and_tokens(demo_shards):
    global_rng = torch.get_rng_state()
    batch = take(make_stream(demo_shards, workers=0), 1)[0]
    assert torch.equal(torch.get_rng_state(), global_rng)  # augmentation draws from its own seeds only
    # uint8 pixels from the workers (a quarter of float32's bytes); the trainer normalises on its device
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.images.float().std() > 10  # a picture, not a flat colour
    assert batch.tokens.shape == (8, 16) and batch.tokens.dtype == torch.int64
    assert (batch.tokens[:, 0] == 2).all()  # BOS first
    normalised = normalize(batch.images, torch.bfloat16)
    assert normalised.dtype == torch.bfloat16
    expected = Normalize(CLIP_MEAN, CLIP_STD)(batch.images.float() / 255)  # torchvision's, as an independent check
    assert torch.allclose(normalize(batch.images), expected, atol=1e-5)
    assert torch.allclose(normalised.float(), expected, atol=0.02)
    assert torch.allclose(denormalize(normalize(batch.images)), batch.images.float() / 255, atol=1e-5)
    assert len(set(batch.keys)) == 8


def test_resampled_streams_are_deterministic_and_differ_across_ranks_and_workers(demo_shards):
    first = [take(make_stream(demo_shards, rank=r, world_size=2), 4) for r in (0, 0, 1)]
    assert all(same(a, b) for a, b in zip(first[0], first[1]))  # same (seed, rank): the same stream
    rank0 = {k for b in first[0] for k in b.keys}
    rank1 = {k for b in first[2] for k in b.keys}
    assert len(rank0 & rank1) < len(rank0) // 4  # resampled independently: overlap only by chance
    assert [b.worker for b in first[0]] == [0, 1, 0, 1]  # DataLoader's turns over the 2 workers
    assert set(first[0][0].keys).isdisjoint(first[0][1].keys)
    other_seed = take(make_stream(demo_shards, seed=1), 1)[0]
    assert other_seed.keys != first[0][0].keys


def test_fixed_list_is_split_by_rank_then_worker_without_repeats(demo_shards):
    # 4 shards of 128 samples, 2 ranks x 2 workers: each stream owns one shard; one pass is 64 batches of 8.
    seen = []
    for rank in (0, 1):
        stream = make_stream(demo_shards, rank=rank, world_size=2, resample=False, shard_shuffle=1)
        batches = take(stream, 32)
        by_worker = {w: {k.split("#")[0] for b in batches if b.worker == w for k in b.keys} for w in (0, 1)}
        assert all(len(shards) == 1 for shards in by_worker.values()) and by_worker[0] != by_worker[1]
        seen += [k for b in batches for k in b.keys]
    assert len(seen) == 512 and len(set(seen)) == 512  # every sample of the pass exactly once


def test_fixed_list_too_short_for_the_streams_is_a_config_error(demo_shards):
    with pytest.raises(ConfigError, match="4 shard.*cannot feed 2 rank.*3 worker"):
        make_stream(demo_shards, world_size=2, resample=False, workers=3)


@pytest.mark.parametrize("consumed", [7, 10])  # 7: resume at a batch index that is not a multiple of 2 workers
def test_resume_equals_the_uninterrupted_stream(demo_shards, consumed):
    # Small blocks and 3 open shards: the resume point lies mid-block with shards open at offsets.
    opts = dict(shard_shuffle=3, sample_shuffle=20, batch_size=6)
    stream = make_stream(demo_shards, **opts)
    it = iter(stream)
    for _ in range(consumed):
        next(it)
    state = pickle.loads(pickle.dumps(stream.state_dict()))  # it travels in DeepSpeed's client_state
    counts = stream.skip_counts()
    after = [next(it) for _ in range(5)]
    stream.close()
    assert len(pickle.dumps(state)) < 4096

    resumed = make_stream(demo_shards, state=state, **opts)
    assert resumed.skip_counts() == counts
    again = take(resumed, 5)
    assert all(same(a, b) for a, b in zip(after, again)), "resumed batches differ from the uninterrupted ones"
    assert [b.worker for b in again][:2] == [consumed % 2, (consumed + 1) % 2]


def test_second_iter_resumes_behind_the_last_batch_taken(demo_shards):
    stream = make_stream(demo_shards, workers=1)
    reference = take(make_stream(demo_shards, workers=1), 5)
    first = take(stream, 3)  # the DataLoader had prefetched more than this; those must not be lost
    rest = take(stream, 2)
    assert all(same(a, b) for a, b in zip(first + rest, reference))


def test_state_from_another_worker_count_is_refused(demo_shards):
    stream = make_stream(demo_shards, workers=0)
    take(stream, 1)
    state = stream.state_dict()
    with pytest.raises(ConfigError, match="data.workers=1"):
        make_stream(demo_shards, workers=2, state=state)


def test_close_stops_the_worker_processes(demo_shards):
    before = set(multiprocessing.active_children())
    stream = make_stream(demo_shards)
    take(stream, 2, close=False)
    assert len(set(multiprocessing.active_children()) - before) == 2
    stream.close()
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("spec", ["{root}/nothing/{{00000..00003}}.tar", "{root}/train/*.tgz"])
def test_a_spec_matching_no_file_fails_at_start_naming_it(demo_shards, tmp_path, spec):
    spec = spec.format(root=demo_shards.root)
    cfg = DataConfig(train=[DataSource(demo_shards.train), DataSource(spec)], workers=0)
    with pytest.raises(ConfigError, match=re.escape(f"shard spec '{spec}' matches no file")):
        TrainStream(cfg, tokenizer_file=demo_shards.tokenizer, context_length=16, image_size=32, batch_size=4,
                    seed=0, rank=0, world_size=1)


def test_weighted_sources_are_drawn_by_weight(demo_shards):
    shards = demo_shards.train.replace("{00000..00003}", "{0}")
    sources = [DataSource(shards.format("{00000..00002}"), weight=3.0), DataSource(shards.format("00003"), weight=1.0)]
    plan = ShardPlan.from_config(DataConfig(train=sources), seed=0)
    draws = [plan.stream(rank=0, world_size=1, worker=0, workers=1).url(n) for n in range(2000)]
    assert abs(sum(d.endswith("00003.tar") for d in draws) / 2000 - 0.25) < 0.03
    assert {d[-9:] for d in draws} == {"00000.tar", "00001.tar", "00002.tar", "00003.tar"}
    assert draws != [plan.stream(rank=0, world_size=1, worker=1, workers=2).url(n) for n in range(2000)]


def test_a_hung_shard_read_stops_the_stream_after_the_timeout(demo_shards, tmp_path):
    """A shard whose read never returns (a FIFO nobody writes to, as a hung file system read looks)
    in one worker's part of a fixed list: the stream raises LoaderStalled after data.timeout_s
    instead of waiting forever, and it is not a DataError (a requeue may well succeed)."""
    good = list_shards(demo_shards.train)[0]
    hung = tmp_path / "00001.tar"
    os.mkfifo(hung)
    cfg = DataConfig(train=[DataSource(f"{{{good},{hung}}}")], tokenizer=demo_shards.tokenizer, workers=2,
                     resample=False, timeout_s=3)
    stream = TrainStream(cfg, tokenizer_file=demo_shards.tokenizer, context_length=16, image_size=32, batch_size=8,
                         seed=0, rank=0, world_size=1)
    start = time.perf_counter()
    with pytest.raises(LoaderStalled, match="delivered nothing for 3 s"):
        take(stream, 4)
    assert 3 <= time.perf_counter() - start < 60 and not issubclass(LoaderStalled, DataError)
    stream.close()


@pytest.mark.parametrize("affinity, cpus, local_ranks, expected", [
    (12, 96, 8, 11),  # srun --cpus-per-task 12 binds each task: its 12 CPUs, one for training
    (96, 96, 8, 11),  # no binding: an eighth of the node each
    (96, 96, 1, 95),
    (1, 2, 2, 1),  # never fewer than one worker
])
def test_default_workers_follow_the_cpus_a_rank_may_use(monkeypatch, affinity, cpus, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert default_workers(local_ranks) == expected
    assert DataConfig().with_workers(local_ranks).workers == expected
    assert DataConfig(workers=3).with_workers(local_ranks).workers == 3  # the recipe's, when it says
