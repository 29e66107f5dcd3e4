"""Bad data on real shards: skipped and counted by cause, never an exception, never a hang."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from webdataset import TarWriter

from flip_ds.data.config import DataConfig, DataSource
from flip_ds.data.faults import CAUSES, DataError
from flip_ds.data.pipeline import TrainStream
from flip_ds.data.reader import ShardReader
from flip_ds.data.shards import ShardPlan
from tests.conftest import jpeg_bytes


def make_stream(spec: str, tokenizer: str, *, seed=0, batch_size=1, state=None, **data) -> TrainStream:
    cfg = DataConfig(train=[DataSource(spec)], **{"workers": 0, "max_skip_rate": 1.0, **data})
    return TrainStream(cfg, tokenizer_file=tokenizer, context_length=16, image_size=32, batch_size=batch_size,
                       seed=seed, rank=0, world_size=1, state=state)


def write_tar(path: Path, samples: list[dict]) -> str:
    with TarWriter(str(path), encoder=False, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)
    return str(path)


def test_one_pass_over_the_faulty_shards_counts_exactly_what_was_injected(faulty_shards, demo_shards):
    """Fixed list, one reader, no shuffling: one pass delivers every good sample once, and the counts
    after its last good sample are exactly the injected faults (a seed whose pass ends with a clean
    shard, so no fault can follow the last good sample)."""
    clean = [faulty_shards.shards[i] for i in (0, 2, 3)]  # shards that end with a good sample
    cfg = DataConfig(train=[DataSource(faulty_shards.spec)], resample=False)
    seed = next(s for s in range(50) if ShardPlan.from_config(cfg, s).stream(0, 1, 0, 1).url(5) in clean)
    stream = make_stream(faulty_shards.spec, demo_shards.tokenizer, seed=seed, resample=False, shard_shuffle=1,
                         sample_shuffle=1)
    it = iter(stream)
    keys = [next(it).keys[0] for _ in range(len(faulty_shards.good_keys))]
    counts = stream.skip_counts()
    stream.close()
    assert sorted(keys) == sorted(faulty_shards.good_keys)
    assert {c: n for c, n in counts.items() if n and c != "samples_read"} == faulty_shards.expected
    assert counts["samples_read"] == 5 * 40 - 10  # the 10 samples after the cut in shard 4 are not there


def test_resampled_workers_consume_the_faulty_shards_without_error(faulty_shards, demo_shards):
    stream = make_stream(faulty_shards.spec, demo_shards.tokenizer, workers=2, batch_size=8, shard_shuffle=2,
                         sample_shuffle=50)
    it = iter(stream)
    keys = {k for _ in range(100) for k in next(it).keys}  # 800 samples: every shard drawn
    counts = stream.skip_counts()
    stream.close()
    assert keys <= faulty_shards.good_keys  # nothing bad ever reaches a batch
    assert {c for c in CAUSES if counts[c]} == set(faulty_shards.expected)  # every kind of fault, counted


def test_reader_classifies_shard_faults(tmp_path):
    rng = np.random.default_rng(0)
    good = write_tar(tmp_path / "good.tar", [{"__key__": f"{i:03d}", "jpg": jpeg_bytes(rng), "txt": b"x"}
                                             for i in range(3)])
    data = Path(good).read_bytes()
    with tarfile.open(good) as tar:
        second = tar.getmembers()[1].offset
    (tmp_path / "cut_header.tar").write_bytes(data[: second + 100])  # ends inside a header: tarfile is silent
    body = data.rstrip(b"\0")
    (tmp_path / "no_end.tar").write_bytes(body + bytes(-len(body) % 512))  # every member, no end-of-archive
    (tmp_path / "garbage.tar").write_bytes(os.urandom(4096))
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "dir.tar").mkdir()
    empty = write_tar(tmp_path / "empty.tar", [])
    expected = {good: None, "cut_header.tar": "truncated_tar", "no_end.tar": "truncated_tar",
                "garbage.tar": "corrupt_tar", "zero.tar": "truncated_tar", "dir.tar": "unreadable_shard",
                empty: "empty_shard", "absent.tar": "missing_shard"}
    for name, fault in expected.items():
        reader = ShardReader(str(tmp_path / name))
        samples = list(reader)
        assert reader.fault == fault, name
        if name in (good, "no_end.tar"):
            assert [s["__key__"] for s in samples] == ["000", "001", "002"]


def test_skip_rate_error_names_the_worst_shard(faulty_shards, demo_shards, tmp_path):
    rng = np.random.default_rng(1)
    bad = write_tar(tmp_path / "bad.tar", [{"__key__": f"{i:03d}", "jpg": rng.bytes(300), "txt": b"broken"}
                                           for i in range(60)])
    spec = f"{faulty_shards.spec}::{bad}"
    stream = make_stream(spec, demo_shards.tokenizer, batch_size=4, max_skip_rate=0.2, skip_rate_min_samples=100,
                         sample_shuffle=64)
    it = iter(stream)
    with pytest.raises(DataError, match=f"worst shard {bad} "):
        for _ in range(500):
            next(it)
            stream.check_skip_rate()
    stream.close()


def test_a_dataset_with_only_bad_samples_stops_instead_of_hanging(tmp_path, demo_shards):
    rng = np.random.default_rng(2)
    for n in range(2):
        write_tar(tmp_path / f"{n}.tar", [{"__key__": f"{i:03d}", "jpg": rng.bytes(200), "txt": b"a caption"}
                                          for i in range(30)])
    stream = make_stream(str(tmp_path / "{0..1}.tar"), demo_shards.tokenizer, workers=2, batch_size=4,
                         max_skip_rate=0.5, skip_rate_min_samples=200, sample_shuffle=50)
    with pytest.raises(DataError, match="corrupt_image"):
        next(iter(stream))  # no batch can ever come; the workers' progress reports trip the limit
    stream.close()


def test_resume_over_faulty_shards_repeats_batches_and_counts(faulty_shards, demo_shards):
    # Blocks of 16 reads and batches of 40: most blocks end without a batch, so workers also send
    # progress items; the resume must replay none of them twice.
    opts = dict(workers=2, batch_size=40, shard_shuffle=2, sample_shuffle=16)
    stream = make_stream(faulty_shards.spec, demo_shards.tokenizer, **opts)
    it = iter(stream)
    for _ in range(9):
        next(it)
    state = stream.state_dict()
    after = [next(it) for _ in range(6)]
    counts = stream.skip_counts()
    stream.close()
    resumed = make_stream(faulty_shards.spec, demo_shards.tokenizer, state=state, **opts)
    it = iter(resumed)
    again = [next(it) for _ in range(6)]
    assert [b.keys for b in again] == [b.keys for b in after]
    assert all((a.images == b.images).all() for a, b in zip(after, again))
    assert resumed.skip_counts() == counts
    resumed.close()


def test_a_worker_whose_shards_are_all_bad_does_not_stall_its_rank(tmp_path, demo_shards):
    # Fixed list of 2 shards over 2 workers: each worker owns one; one shard holds only corrupt images.
    rng = np.random.default_rng(3)
    bad = write_tar(tmp_path / "bad.tar", [{"__key__": f"{i:03d}", "jpg": rng.bytes(200), "txt": b"a caption"}
                                           for i in range(60)])
    good = demo_shards.train.replace("{00000..00003}", "00000")
    stream = make_stream(f"{good}::{bad}", demo_shards.tokenizer, workers=2, batch_size=8, resample=False)
    it = iter(stream)
    batches = [next(it) for _ in range(20)]  # 160 samples: more than one pass over the good shard
    counts = stream.skip_counts()
    stream.close()
    assert len({b.worker for b in batches}) == 1 and all(k.startswith(good) for b in batches for k in b.keys)
    assert counts["corrupt_image"] >= 60 and counts["samples_read"] >= 160 + 60
