"""Writing image-caption pairs as webdataset shards in img2dataset's layout.

Each sample becomes KEY.jpg, KEY.txt (the caption, UTF-8) and KEY.json (key, caption, source path,
sizes), in shards {00000..N}.tar of `samples_per_shard` samples; keys are img2dataset's: the shard
number (5 digits) then the index in the shard. A JPEG that needs no resizing is stored byte for
byte; anything else is re-encoded as JPEG.

Samples are written in a random order drawn from a seed (or, asked, in the input's order). The
training stream mixes only the samples that sit near each other in a few open shards (docs/data.md),
so input that comes sorted, a class-per-folder tree above all, would otherwise give batches of one
class, hence one caption, from which a contrastive model learns nothing. The output depends only on
the input and the seed: workers return results in order, tar headers carry no time or owner of
this machine.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import ShardWriter

from flip_ds.config_loader import UsageError
from flip_ds.data.captions_table import read_caption_table
from flip_ds.data.reader import IMAGE_KEYS

# a class tree's images: the formats shards hold, and others that are re-encoded as JPEG
IMAGE_SUFFIXES = (*(f".{key}" for key in IMAGE_KEYS), ".bmp", ".gif", ".tif", ".tiff")
SKIP_CAUSES = ("missing_file", "corrupt_image", "empty_caption")


@dataclass(frozen=True)
class Pair:
    path: str  # as written in the captions file (or relative to the class tree)
    file: str  # where to read it
    caption: str


@dataclass
class Summary:
    samples: int
    shards: int
    skipped: dict[str, int]
    out: str
    shuffle_seed: int | None = None  # None: the input's order

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "nothing"
        order = "in input order" if self.shuffle_seed is None else f"shuffled with seed {self.shuffle_seed}"
        return f"wrote {self.samples} samples in {self.shards} shard(s) to {self.out}, {order}; skipped: {skipped}"


def read_captions(captions: str, images: str, path_column: str | None = None,
                  caption_column: str | None = None) -> list[Pair]:
    """Pairs from a captions file (captions_table.py: CSV/TSV, JSON/JSONL or parquet), one per caption;
    image paths are relative to `images`."""
    pairs = []
    for row in read_caption_table(captions, path_column, caption_column):
        file = os.path.join(images, row.path) if row.path else ""
        # a row without a caption still becomes a pair, so it is skipped and counted as empty_caption
        pairs.extend(Pair(row.path, file, caption) for caption in row.captions or [""])
    return pairs


def read_templates(templates: str) -> list[str]:
    """A file of templates (one a line) or one template; each has a single {} for the class name."""
    lines = Path(templates).read_text(encoding="utf-8").splitlines() if os.path.isfile(templates) else [templates]
    lines = [t.strip() for t in lines if t.strip()]
    if not lines or any(t.count("{}") != 1 for t in lines):
        raise UsageError(f"templates '{templates}': every template needs exactly one {{}} for the class name")
    return lines


def read_class_tree(root: str, templates: list[str], classnames: str | None = None) -> list[Pair]:
    """One pair per image of a class-per-folder tree; caption = a template filled with the class name.

    The template of an image is chosen by a hash of its path, so adding images changes no other caption.
    Class names are the folder names with '_' as spaces, or the lines of `classnames` (sorted folder order).
    """
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"class folder tree '{root}' does not exist")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"class folder tree '{root}' has no class sub-folders")
    names = [c.replace("_", " ") for c in classes]
    if classnames:
        names = [n.strip() for n in Path(classnames).read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(names) != len(classes):
            raise UsageError(f"classnames '{classnames}' has {len(names)} names for {len(classes)} class folders")
    pairs = []
    for folder, name in zip(classes, names):
        for file in sorted((base / folder).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                rel = file.relative_to(base).as_posix()
                pairs.append(Pair(rel, str(file), templates[zlib.crc32(rel.encode()) % len(templates)].format(name)))
    return pairs


def shuffle_pairs(pairs: list[Pair], seed: int) -> list[Pair]:
    """`pairs` in a random order that depends only on `seed` and their number."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]


def _encode(pair: Pair, max_side: int, quality: int) -> tuple[bytes, dict] | str:
    """(JPEG bytes, metadata) of one pair, or the skip cause."""
    if not pair.caption.strip():
        return "empty_caption"
    try:
        with open(pair.file, "rb") as f:
            data = f.read()
    except OSError:  # not there, a directory, no permission, or an empty path
        return "missing_file"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # a full decode: truncated or corrupt files are caught here
        original = image.size
        scale = max_side / max(original) if max_side else 1.0
        if scale < 1.0 or image.format != "JPEG":  # otherwise the original bytes are stored
            image = image.convert("RGB")
            if scale < 1.0:
                size = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            data = out.getvalue()
        size = image.size
    except Exception:  # PIL raises many exception types on hostile bytes
        return "corrupt_image"
    meta = {"caption": pair.caption, "source": pair.path, "width": size[0], "height": size[1],
            "original_width": original[0], "original_height": original[1], "status": "success"}
    return data, meta


def _encode_job(job: tuple[Pair, int, int]) -> tuple[bytes, dict] | str:
    return _encode(*job)


def write_shards(pairs: list[Pair], out: str, samples_per_shard: int = 10000, max_side: int = 0,
                 quality: int = 95, workers: int = 1, progress: bool = True, shuffle_seed: int | None = 0) -> Summary:
    """Write `pairs` as shards under `out`, skipping (and counting) what cannot be used.

    They are written in the order shuffle_pairs(pairs, shuffle_seed) gives, or as they come when
    `shuffle_seed` is None.
    """
    if samples_per_shard < 1:
        raise UsageError(f"samples per shard: {samples_per_shard} must be >= 1")
    if max_side < 0:
        raise UsageError(f"max side: {max_side} must be >= 0 (0 keeps the size)")
    if shuffle_seed is not None and shuffle_seed < 0:
        raise UsageError(f"seed: {shuffle_seed} must be >= 0")
    Path(out).mkdir(parents=True, exist_ok=True)
    stale = sorted(Path(out).glob("*.tar"))
    if stale:
        raise UsageError(f"output directory '{out}' already holds shards ({stale[0].name}, ...); use an empty one")
    if shuffle_seed is not None:
        pairs = shuffle_pairs(pairs, shuffle_seed)
    digits = len(str(samples_per_shard - 1))
    skipped: Counter[str] = Counter(dict.fromkeys(SKIP_CAUSES, 0))
    written = 0
    jobs = ((pair, max_side, quality) for pair in pairs)
    with Pool(max(workers, 1)) as pool, ShardWriter(os.path.join(out, "%05d.tar"), maxcount=samples_per_shard,
                                                    verbose=0, encoder=False, mtime=0) as sink:
        results: Iterator = pool.imap(_encode_job, jobs, chunksize=16)
        for result in tqdm(results, total=len(pairs), unit="img", disable=not progress, desc="make-shards"):
            if isinstance(result, str):
                skipped[result] += 1
                continue
            data, meta = result
            key = f"{written // samples_per_shard:05d}{written % samples_per_shard:0{digits}d}"
            sink.write({"__key__": key, "jpg": data, "txt": meta["caption"].encode("utf-8"),
                        "json": json.dumps({"key": key, **meta}, ensure_ascii=False).encode("utf-8")})
            written += 1
        shards = sink.shard
    summary = Summary(written, shards if written else 0, dict(skipped), out, shuffle_seed)
    if not written:  # ShardWriter opened one shard before it knew there would be nothing to write
        for tar in Path(out).glob("*.tar"):
            tar.unlink()
    return summary
