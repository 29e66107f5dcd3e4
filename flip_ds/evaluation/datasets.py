"""Evaluation data on disk: an ImageNet-style folder, or a retrieval set (images with several captions).

Retrieval sets come as
  - a captions file, read by the reader `flip-ds make-shards` uses (flip_ds/data/captions_table.py),
    with its column names: CSV/TSV with one row per caption (OpenCLIP's format), JSON/JSONL records
    whose caption may be a list (the Karpathy-split annotation files of BLIP/LAVIS), or parquet; the
    rows of one image are grouped. Relative image paths start at `image_root`, or at the file's folder;
  - a Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`; karpathy.py): one split of
    it (the test split by default), its image paths under `image_root`;
  - webdataset shards (a spec, several joined with '::'), read by the training reader
    (flip_ds/data/reader.py): a sample's image is the one training would use, its captions the lines
    of KEY.txt (decoded as training decodes it) or else KEY.json's caption column.

Images are decoded lazily, one item at a time; an image that cannot be read yields a zero tensor
and valid=False, so the caller skips and counts it instead of crashing. A shard is a stream (maybe
compressed or remote) with no random access, so a shard set keeps its images in memory, encoded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform

from flip_ds.config_loader import UsageError
from flip_ds.data.captions_table import CaptionRow, is_caption_table, read_caption_table, record_captions
from flip_ds.data.reader import ShardReader, Skip, parse_caption, parse_image
from flip_ds.data.shards import expand_spec
from flip_ds.data.transforms import CLIP_MEAN, CLIP_STD, decode_image
from flip_ds.evaluation.karpathy import DEFAULT_SPLIT, check_images_exist, karpathy_rows, read_karpathy_json

# A shard's fault that leaves its samples readable; any other fault makes the set unusable
_HARMLESS_SHARD_FAULTS = (None, "empty_shard")


@dataclass(frozen=True)
class ShardImage:
    """The encoded image of shard sample `key`, as the training reader read it."""

    shard: str
    key: str
    data: bytes


ImageRef = str | ShardImage


@dataclass
class ClassificationSet:
    images: list[ImageRef]
    labels: list[int]
    classes: list[str]  # folder names, sorted: label i is classes[i]


@dataclass
class RetrievalSet:
    images: list[ImageRef]
    captions: list[str]
    caption_image: list[int]  # caption j describes images[caption_image[j]]
    skipped_samples: int = 0  # shard samples with an image but no caption, or the reverse
    sources: list[str] = field(default_factory=list)
    split: str = ""  # the split read from a Karpathy-split JSON; "" for the other formats


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Shorter side to `image_size` (bicubic), centre crop, the training pipeline's CLIP normalisation."""
    return create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=1.0,
                            mean=CLIP_MEAN, std=CLIP_STD)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, readable) per reference; unreadable images give zeros and False."""

    def __init__(self, images: list[ImageRef], image_size: int) -> None:
        self.images = images
        self.image_size = image_size
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            image = decode_image(_read_bytes(self.images[index]))  # the training pipeline's decoder, full size
        except (OSError, Skip):  # missing file / undecodable bytes
            return torch.zeros(3, self.image_size, self.image_size), False
        return self.transform(image), True


def _read_bytes(ref: ImageRef) -> bytes:
    if isinstance(ref, ShardImage):
        return ref.data
    with open(ref, "rb") as f:
        return f.read()


def read_image_folder(root: str) -> ClassificationSet:
    """An ImageNet-style folder: one sub-folder per class; labels follow the sorted folder names."""
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise UsageError(f"image folder '{root}' does not exist or is not a directory")
    try:
        folder = ImageFolder(root, allow_empty=True)
    except FileNotFoundError as e:
        raise UsageError(f"image folder '{root}': {e}") from None
    if not folder.samples:
        raise UsageError(f"image folder '{root}' has no images in class sub-folders")
    return ClassificationSet(images=[p for p, _ in folder.samples], labels=[y for _, y in folder.samples],
                             classes=list(folder.classes))


def read_retrieval_set(spec: str, image_root: str = "", split: str = "") -> RetrievalSet:
    """A retrieval set from a Karpathy-split JSON (its `split`, "" = test), a captions file (CSV/TSV,
    JSON/JSONL, parquet) or webdataset shards."""
    root = Path(image_root) if image_root else Path(spec).parent
    karpathy = read_karpathy_json(spec)
    if karpathy is not None:
        data = _group(karpathy_rows(karpathy, split, spec), root, spec)
        data.split = split or DEFAULT_SPLIT
        check_images_exist([str(p) for p in data.images], root, spec, data.split)
        return data
    if split:  # the other formats hold one set: a split asked of them would be silently ignored
        _refuse_split(spec, split)
    if not is_caption_table(spec):
        return _read_shards(spec)
    return _group(read_caption_table(spec), root, spec)


def _refuse_split(spec: str, split: str) -> None:
    if is_caption_table(spec) and not Path(spec).is_file():
        raise UsageError(f"captions file '{spec}' does not exist")  # the first thing to fix
    raise UsageError(f"split '{split}' applies only to a Karpathy-split JSON (dataset_coco.json, "
                     f"dataset_flickr30k.json); '{spec}' is not one")


def _group(rows: list[CaptionRow], root: Path, spec: str) -> RetrievalSet:
    """One image per distinct path (first appearance order), all its non-blank captions attached."""
    index: dict[str, int] = {}
    images: list[ImageRef] = []
    captions: list[str] = []
    owner: list[int] = []
    for row in rows:
        if row.path not in index:
            index[row.path] = len(images)
            images.append(str(root / row.path))
        for c in row.captions:
            if c.strip():
                captions.append(c)
                owner.append(index[row.path])
    if not images or not captions:
        raise UsageError(f"retrieval set '{spec}' has no image with a caption")
    return RetrievalSet(images=images, captions=captions, caption_image=owner, sources=[spec])


def _read_shards(spec: str) -> RetrievalSet:
    shards = expand_spec(spec)
    images: list[ImageRef] = []
    captions: list[str] = []
    owner: list[int] = []
    skipped = 0
    for url in shards:
        reader = ShardReader(url)
        for raw in reader:
            image, caps = _sample_image(raw), _sample_captions(raw)
            if image is None or not caps:
                skipped += 1
                continue
            owner.extend([len(images)] * len(caps))
            captions.extend(caps)
            images.append(ShardImage(url, raw["__key__"], image))
        if reader.fault not in _HARMLESS_SHARD_FAULTS:  # a set with a hole would give numbers of another set
            raise UsageError(f"retrieval shard '{url}' cannot be read ({reader.fault})")
    if not images:
        raise UsageError(f"retrieval shards '{spec}' hold no sample with an image and a caption "
                          f"({len(shards)} shard(s), {skipped} incomplete sample(s))")
    return RetrievalSet(images=images, captions=captions, caption_image=owner, skipped_samples=skipped,
                        sources=shards)


def _sample_image(raw: dict[str, Any]) -> bytes | None:
    try:
        return parse_image(raw)
    except Skip:
        return None


def _sample_captions(raw: dict[str, Any]) -> list[str]:
    """The captions of a shard sample: KEY.txt's non-blank lines, decoded as training decodes its caption;
    without a usable KEY.txt, KEY.json's caption column (captions_table.CAPTION_COLUMNS)."""
    try:
        return [line.strip() for line in parse_caption(raw).splitlines() if line.strip()]
    except Skip:
        pass
    try:
        record = json.loads(raw["json"]) if "json" in raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [c.strip() for c in record_captions(record) if c.strip()] if isinstance(record, dict) else []
