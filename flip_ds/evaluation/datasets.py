"""Evaluation data on disk: an ImageNet-style folder, or a retrieval set (images with several captions).

Retrieval sets come as
  - a CSV/TSV file with a header naming an image column (`image` or `filepath`) and a caption
    column (`caption` or `title`), one row per caption (OpenCLIP's CSV format);
  - a JSONL file, or a JSON file holding a list, of records `{"image": path, "captions": [...]}`
    (`"caption"` may be a string or a list: the Karpathy-split annotation files of BLIP/LAVIS);
  - webdataset shards (a brace spec, several joined with '::'): KEY.jpg|jpeg|png|webp with
    KEY.txt (one caption a line) or KEY.json (`captions` / `caption`).
Relative image paths start at `image_root`, or at the annotation file's folder.

Images are decoded lazily, one item at a time; an image that cannot be read yields a zero tensor
and valid=False, so the caller skips and counts it instead of crashing.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform

from flip_ds.config_loader import ConfigError
from flip_ds.data.reader import Skip
from flip_ds.data.transforms import CLIP_MEAN, CLIP_STD, decode_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar shard: read `size` bytes at `offset` (no archive walk per read)."""

    shard: str
    offset: int
    size: int


ImageRef = str | TarMember


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
    with open(ref.shard if isinstance(ref, TarMember) else ref, "rb") as f:
        if isinstance(ref, TarMember):
            f.seek(ref.offset)
            return f.read(ref.size)
        return f.read()


def read_image_folder(root: str) -> ClassificationSet:
    """An ImageNet-style folder: one sub-folder per class; labels follow the sorted folder names."""
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise ConfigError(f"image folder '{root}' does not exist or is not a directory")
    try:
        folder = ImageFolder(root, allow_empty=True)
    except FileNotFoundError as e:
        raise ConfigError(f"image folder '{root}': {e}") from None
    if not folder.samples:
        raise ConfigError(f"image folder '{root}' has no images in class sub-folders")
    return ClassificationSet(images=[p for p, _ in folder.samples], labels=[y for _, y in folder.samples],
                             classes=list(folder.classes))


def read_retrieval_set(spec: str, image_root: str = "") -> RetrievalSet:
    """A retrieval set from a CSV/TSV, JSON or JSONL annotation file, or from webdataset shards."""
    suffix = Path(spec).suffix.lower()
    if suffix in (".csv", ".tsv", ".json", ".jsonl"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"retrieval annotations '{spec}' do not exist")
        root = Path(image_root) if image_root else path.parent
        records = _read_csv(path) if suffix in (".csv", ".tsv") else _read_json(path)
        return _group(records, root, spec)
    return _read_shards(spec)


def _read_csv(path: Path) -> list[tuple[str, list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",\t")
    except csv.Error:
        raise ConfigError(f"retrieval CSV '{path}': cannot tell the delimiter (comma or tab) from its header") from None
    rows = csv.DictReader(text.splitlines(), dialect=dialect)
    fields = rows.fieldnames or []
    image_col = next((c for c in ("image", "filepath") if c in fields), None)
    caption_col = next((c for c in ("caption", "title") if c in fields), None)
    if image_col is None or caption_col is None:
        raise ConfigError(f"retrieval CSV '{path}' needs an 'image' (or 'filepath') and a 'caption' (or 'title') "
                          f"column; its header has {fields}")
    return [(row[image_col], [row[caption_col]]) for row in rows]


def _read_json(path: Path) -> list[tuple[str, list[str]]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise ConfigError(f"retrieval JSON '{path}' must hold a list of {{image, captions}} records")
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"retrieval annotations '{path}' are not valid JSON: {e}") from None
    records = []
    for i, item in enumerate(items):
        captions = _captions_of(item) if isinstance(item, dict) else None
        if captions is None or not isinstance(item.get("image"), str):
            raise ConfigError(f"retrieval annotations '{path}', record {i}: need 'image' (a path) and 'captions' "
                              f"(a list) or 'caption' (a string or list); got {str(item)[:120]}")
        records.append((item["image"], captions))
    return records


def _captions_of(obj: dict) -> list[str] | None:
    captions = obj.get("captions", obj.get("caption"))
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    return [c for c in captions if c.strip()]


def _group(records: list[tuple[str, list[str]]], root: Path, spec: str) -> RetrievalSet:
    """One image per distinct path (first appearance order), all its captions attached."""
    index: dict[str, int] = {}
    images: list[ImageRef] = []
    captions: list[str] = []
    owner: list[int] = []
    for image, caps in records:
        if image not in index:
            index[image] = len(images)
            images.append(str(root / image))
        for c in caps:
            captions.append(c)
            owner.append(index[image])
    if not images or not captions:
        raise ConfigError(f"retrieval set '{spec}' has no image with a caption")
    return RetrievalSet(images=images, captions=captions, caption_image=owner, sources=[spec])


def _read_shards(spec: str) -> RetrievalSet:
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import base_plus_ext

    shards = expand_urls(spec)
    images: list[ImageRef] = []
    captions: list[str] = []
    owner: list[int] = []
    skipped = 0
    for shard in shards:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if member.isfile() and key is not None:
                        samples.setdefault(key, {})[ext.lower()] = member
                texts = {key: _shard_captions(tar, files) for key, files in samples.items()}
        except (OSError, tarfile.TarError) as e:
            raise ConfigError(f"retrieval shard '{shard}' cannot be read: {e}") from None
        for key, files in samples.items():
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            caps = texts[key]
            if image is None or not caps:
                skipped += 1
                continue
            owner.extend([len(images)] * len(caps))
            captions.extend(caps)
            images.append(TarMember(shard, image.offset_data, image.size))
    if not images:
        raise ConfigError(f"retrieval shards '{spec}' hold no sample with an image and a caption "
                          f"({len(shards)} shard(s), {skipped} incomplete sample(s))")
    return RetrievalSet(images=images, captions=captions, caption_image=owner, skipped_samples=skipped,
                        sources=shards)


def _shard_captions(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo]) -> list[str]:
    if "txt" in files:
        text = tar.extractfile(files["txt"]).read().decode("utf-8", errors="replace")
        return [line.strip() for line in text.splitlines() if line.strip()]
    if "json" in files:
        try:
            obj = json.loads(tar.extractfile(files["json"]).read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        return (_captions_of(obj) or []) if isinstance(obj, dict) else []
    return []
