"""(image path, captions) tables: the captions files of `flip-ds make-shards` and `flip-ds eval retrieval`.

One reader, one set of column names, so a file one command accepts the other accepts too:

  - CSV or TSV with a header (a tab in the header line makes it tab-separated), one row per caption:
    OpenCLIP's CSV format;
  - JSON lines, or a JSON file holding a list of records (BLIP / LAVIS's Karpathy-split annotations);
  - parquet (needs pyarrow).

The path column is the first of PATH_COLUMNS present, the caption column the first of
CAPTION_COLUMNS, unless the caller names them. A caption cell may be a string or a list of strings
(several captions of one image). Cells are returned as they are, empty ones included: each command
decides what an empty path or caption means (make-shards skips and counts it).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_ds.config_loader import UsageError

PATH_COLUMNS = ("path", "image", "filepath", "file")
CAPTION_COLUMNS = ("caption", "captions", "text", "title")
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class CaptionRow:
    path: str  # as written in the file: relative paths are the caller's to resolve
    captions: list[str]


def is_caption_table(name: str) -> bool:
    """Whether `name` is a captions file by its suffix (anything else may be a shard spec)."""
    return Path(name).suffix.lower() in TABLE_SUFFIXES


def read_caption_table(name: str, path_column: str | None = None,
                       caption_column: str | None = None) -> list[CaptionRow]:
    """The rows of a CSV/TSV, JSON/JSONL or parquet captions file; a file that cannot be read, or has
    no usable path or caption column, is a one-line UsageError naming it."""
    source = Path(name)
    if not source.is_file():
        raise UsageError(f"captions file '{name}' does not exist")
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        fields, rows = _read_csv(source)
    elif suffix in (".json", ".jsonl"):
        fields, rows = _read_json(source)
    elif suffix == ".parquet":
        fields, rows = _read_parquet(source)
    else:
        raise UsageError(f"captions file '{name}': unknown format '{suffix}' (use {', '.join(TABLE_SUFFIXES)})")
    path_col = _column(fields, path_column, PATH_COLUMNS, name, "path")
    caption_col = _column(fields, caption_column, CAPTION_COLUMNS, name, "caption")
    return [CaptionRow(_text(row.get(path_col)), _captions(row.get(caption_col))) for row in rows]


def _read_csv(source: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with open(source, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often start with a BOM
        delimiter = "\t" if "\t" in f.readline() else ","
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)  # a file reader: quoted captions may span lines
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_json(source: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """A JSON document (a list of records, or one record), else JSON lines: whatever the suffix says."""
    text = source.read_text(encoding="utf-8-sig")  # as for CSV: a spreadsheet's byte-order mark is no content
    try:
        document = json.loads(text)
        records = document if isinstance(document, list) else [document]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UsageError(f"captions file '{source}' is neither JSON nor JSON lines: {e}") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise UsageError(f"captions file '{source}', record {i}: not an object with a path and a caption: "
                              f"{str(record)[:120]}")
    return sorted({k for record in records for k in record}), records


def _read_parquet(source: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(source)
    return table.column_names, table.to_pylist()


def _column(fields: list[str], wanted: str | None, candidates: tuple[str, ...], source: str, what: str) -> str:
    if wanted:
        if wanted not in fields:
            raise UsageError(f"captions file '{source}' has no column '{wanted}'; it has {fields}")
        return wanted
    found = next((c for c in candidates if c in fields), None)
    if found is None:
        raise UsageError(f"captions file '{source}' needs a {what} column (one of {', '.join(candidates)}); "
                          f"it has {fields}")
    return found


def record_captions(record: dict[str, Any]) -> list[str]:
    """The captions of one record (a shard sample's KEY.json, say) in its first CAPTION_COLUMNS column."""
    column = next((c for c in CAPTION_COLUMNS if c in record), None)
    return _captions(record[column]) if column else []


def _text(cell: Any) -> str:
    return "" if cell is None else str(cell)


def _captions(cell: Any) -> list[str]:
    """A caption cell as a list: a list cell holds several captions, a missing one none."""
    if isinstance(cell, list):
        return [_text(c) for c in cell]
    return [] if cell is None else [str(cell)]
