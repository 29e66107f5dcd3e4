"""Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`) read as a retrieval set.

These are the files most people hold for Flickr30k and COCO retrieval (Karpathy & Fei-Fei's
caption_datasets.zip): one object, {"images": [...], "dataset": ...}, each image
{"filename", "filepath" (COCO only: "val2014", ...), "split": "train" | "val" | "test" | "restval",
"sentences": [{"raw": ..., "tokens": [...], ...}, ...]}. The format is recognised by that structure,
not by the file name. One split is evaluated (the test split unless asked otherwise), with the first
CAPTIONS_PER_IMAGE sentences of each image: Flickr30k's test split is 1,000 images x 5,000 captions
and COCO's 5,000 x 25,000, as the retrieval literature counts them (a few COCO images have 6 or 7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flip_ds.config_loader import UsageError
from flip_ds.data.captions_table import CaptionRow

SPLITS = ("test", "val", "train", "restval")
DEFAULT_SPLIT = "test"
CAPTIONS_PER_IMAGE = 5


def read_karpathy_json(name: str) -> dict[str, Any] | None:
    """The document of a Karpathy-split JSON file, or None when `name` is another captions file.

    Only a JSON file whose first character is '{' is parsed here: a list of records (BLIP/LAVIS's
    annotations) or JSON lines start otherwise and are left to the captions-table reader, so a large
    file is never parsed twice.
    """
    source = Path(name)
    if source.suffix.lower() != ".json" or not source.is_file() or not _starts_with_object(source):
        return None
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # the captions-table reader names the fault (or reads it as JSON lines)
    return document if is_karpathy(document) else None


def _starts_with_object(source: Path) -> bool:
    with open(source, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def is_karpathy(document: Any) -> bool:
    """An object holding an "images" list whose entries all carry "sentences"."""
    images = document.get("images") if isinstance(document, dict) else None
    return isinstance(images, list) and all(isinstance(e, dict) and "sentences" in e for e in images)


def karpathy_rows(document: dict[str, Any], split: str, source: str) -> list[CaptionRow]:
    """The images of `split` as (filepath/filename, first CAPTIONS_PER_IMAGE raw sentences) rows."""
    split = split or DEFAULT_SPLIT
    rows = [CaptionRow(_image_path(entry, source), _sentences(entry, source))
            for entry in document["images"] if entry.get("split") == split]
    if not rows:
        present = sorted({str(e.get("split")) for e in document["images"]})
        raise UsageError(f"Karpathy-split JSON '{source}' has no image in split '{split}' "
                         f"(splits present: {', '.join(present) or 'none'})")
    return rows


def _image_path(entry: dict[str, Any], source: str) -> str:
    """filepath/filename (COCO: 'val2014/COCO_val2014_...jpg') or filename alone (Flickr30k)."""
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise UsageError(f"Karpathy-split JSON '{source}': an image has no filename: {str(entry)[:120]}")
    filepath = entry.get("filepath")
    return f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename


def _sentences(entry: dict[str, Any], source: str) -> list[str]:
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                  for s in sentences):
        raise UsageError(f"Karpathy-split JSON '{source}', image '{entry.get('filename')}': "
                         "sentences must be a list of objects with a 'raw' caption")
    return [s["raw"] for s in sentences[:CAPTIONS_PER_IMAGE]]


def check_images_exist(images: list[str], root: Path, source: str, split: str) -> None:
    """A wrong image root makes every image unreadable; say so now, not after the model has loaded.
    Some missing images are left to the evaluation, which skips and counts them."""
    if not root.is_dir():
        raise UsageError(f"image root '{root}' of '{source}' is not a directory")
    if not any(Path(p).is_file() for p in images):
        raise UsageError(f"none of the {len(images)} images of split '{split}' of '{source}' "
                         f"is under image root '{root}' (the first would be '{images[0]}'; "
                         "set --image-root or the eval set's image_root)")
