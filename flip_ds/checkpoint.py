"""Step-level checkpoints that are complete or invisible.

Layout under OUTPUT_DIR/checkpoints (a DeepSpeed save_dir):
    TAG/                 DeepSpeed's per-rank model and optimizer shards
    TAG/recipe.yaml      the resolved recipe         } written by rank 0 after every rank
    TAG/tokenizer.model  the SentencePiece model     } finished its shards, meta.json last
    TAG/meta.json        samples seen, step, phase, world size
    latest               the newest complete TAG, replaced atomically after meta.json exists

A rank killed while saving leaves a TAG without meta.json that `latest` never names, so
`resume=auto` cannot pick it; the next save of the same tag overwrites it.

A run resumed on another number of ranks reads a universal copy of its checkpoint
(OUTPUT_DIR/checkpoints_universal/TAG, made once by DeepSpeed's ds_to_universal), since ZeRO's
optimizer shards are cut per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from flip_ds.config import Recipe
from flip_ds.config_loader import ConfigError, to_dict
from flip_ds.distributed import barrier

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, root: Path, step: int, client_state: dict[str, Any], recipe: Recipe, tokenizer_file: str,
         meta: dict[str, Any], rank: int) -> Path:
    """Save on every rank (a collective), then make it visible. Returns the tag directory."""
    tag = tag_for(step)
    if rank == 0 and (root / tag).exists():  # debris of an interrupted save of this very step
        shutil.rmtree(root / tag)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        tag_dir = root / tag
        (tag_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        shutil.copyfile(tokenizer_file, tag_dir / "tokenizer.model")
        _write_atomic(tag_dir / META, json.dumps(meta, indent=2))
        _write_atomic(root / "latest", tag)
    barrier()
    return root / tag


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META).is_file()


def read_meta(save_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((save_dir / tag / META).read_text())


def universal_copy(save_dir: Path, tag: str, rank: int) -> tuple[Path, str]:
    """(save_dir, tag) of a world-size-independent copy of checkpoint `tag`, which every rank can
    load whatever the world size it was saved on. Rank 0 converts (once: a finished conversion is
    reused); every rank calls this (a collective)."""
    root = save_dir.parent / f"{save_dir.name}_universal"
    done = root / tag / ".complete"
    if rank == 0 and not done.is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(root / tag, ignore_errors=True)  # debris of an interrupted conversion
        root.mkdir(parents=True, exist_ok=True)
        args = argparse.Namespace(input_folder=str(save_dir / tag), output_folder=str(root / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports its progress with print()
            ds_to_universal(args)
        done.touch()
    barrier()
    return root, tag


def find_resume(recipe: Recipe, root: Path) -> tuple[Path, str] | None:
    """(save_dir, tag) to resume from per `recipe.resume`, or None to start fresh."""
    if recipe.resume == "none":
        return None
    if recipe.resume == "auto":
        return _latest_of(root) if (root / "latest").is_file() else None
    path = Path(recipe.resume)
    if (path / "latest").is_file():
        return _latest_of(path)
    if not is_complete(path):
        raise ConfigError(f"resume: '{path}' is not a complete flip-ds checkpoint (no {META})")
    return path.parent, path.name


def _latest_of(root: Path) -> tuple[Path, str]:
    tag = (root / "latest").read_text().strip()
    if not is_complete(root / tag):
        raise ConfigError(f"resume: {root / 'latest'} names '{tag}', which is incomplete; point resume= at a tag")
    return root, tag


def prune(root: Path, keep_last: int, milestones: set[str]) -> None:
    """Delete complete periodic checkpoints beyond the newest `keep_last`; milestones stay."""
    tags = sorted(p.name for p in root.glob("step_*") if is_complete(p) and p.name not in milestones)
    for tag in tags[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)
