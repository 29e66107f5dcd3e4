"""Shared fixtures: a small built-in dataset and a shard set with known, injected faults."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from flip_ds.data.synthetic import DemoData, make_demo_dataset


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """The built-in dataset, small: 512 training samples of 64 px in 4 shards of 128, a 16-class
    zero-shot folder (4 images a class), 16 retrieval images and a SentencePiece tokenizer."""
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), train_samples=512, samples_per_shard=128,
                             eval_per_class=4, retrieval_images=16, image_size=64)


def jpeg_bytes(rng: np.random.Generator, size: int = 48) -> bytes:
    image = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


@dataclass
class FaultySet:
    """Shards with injected faults: what a reader must skip (by cause) and the keys it must deliver."""

    spec: str  # lists 6 shards; the last is absent
    shards: list[str]
    expected: dict[str, int]  # cause -> count in one pass
    good_keys: set[str] = field(default_factory=set)  # 'url#key' of every usable sample
    samples_per_shard: int = 40


def write_faulty_shards(root: Path) -> FaultySet:
    """5 shards of 40 samples (200) plus a listed but absent sixth. Injected: 10 corrupt JPEGs (5%: 5 random
    bytes, 5 cut in half), 3 empty captions, 1 sample without .txt, 1 without an image, 1 non-UTF-8 caption,
    and shard 4 truncated inside the image of its sample 30 (samples 30-39 are lost with it)."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    faults = {(0, 3): "garbage", (0, 17): "half_jpeg", (1, 5): "garbage", (1, 22): "half_jpeg", (1, 39): "garbage",
              (2, 8): "half_jpeg", (2, 9): "garbage", (3, 0): "half_jpeg", (3, 33): "garbage", (4, 12): "half_jpeg",
              (0, 25): "empty_caption", (2, 30): "empty_caption", (3, 14): "empty_caption",
              (1, 11): "no_txt", (3, 7): "no_image", (2, 19): "non_utf8"}
    shards, good = [], set()
    for shard in range(5):
        path = str(root / f"{shard:05d}.tar")
        shards.append(path)
        with TarWriter(path, encoder=False, mtime=0) as tar:
            for i in range(40):
                key = f"{shard:05d}{i:04d}"
                fault = faults.get((shard, i))
                jpg = jpeg_bytes(rng)
                sample = {"__key__": key, "jpg": jpg, "txt": f"sample {i} of shard {shard}".encode(),
                          "json": json.dumps({"key": key}).encode()}
                if fault == "garbage":
                    sample["jpg"] = rng.bytes(len(jpg))
                elif fault == "half_jpeg":
                    sample["jpg"] = jpg[: len(jpg) // 2]
                elif fault == "empty_caption":
                    sample["txt"] = b"  \n "
                elif fault == "no_txt":
                    del sample["txt"]
                elif fault == "no_image":
                    del sample["jpg"]
                elif fault == "non_utf8":
                    sample["txt"] = b"caf\xe9 \xff"
                tar.write(sample)
                if fault is None and not (shard == 4 and i >= 30):
                    good.add(f"{path}#{key}")
        if shard == 4:  # cut inside sample 30's jpg: its header is whole, its data is not
            with tarfile.open(path) as tar:
                cut = tar.getmember(f"{shard:05d}0030.jpg").offset_data + 100
            Path(path).write_bytes(Path(path).read_bytes()[:cut])
    expected = {"corrupt_image": 10, "empty_caption": 3, "missing_caption": 1, "missing_image": 1,
                "non_utf8_caption": 1, "truncated_tar": 1, "missing_shard": 1}
    return FaultySet(str(root / "{00000..00005}.tar"), [*shards, str(root / "00005.tar")], expected, good)


@pytest.fixture(scope="session")
def faulty_shards(tmp_path_factory: pytest.TempPathFactory) -> FaultySet:
    return write_faulty_shards(tmp_path_factory.mktemp("faulty"))
