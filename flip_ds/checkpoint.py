"""Checkpoints: saved complete or invisible, found from any of the paths a user may give, and read
back as a model (`flip_ds.load`).

Layout under OUTPUT_DIR/checkpoints (a DeepSpeed save_dir):
    TAG/                 DeepSpeed's per-rank model and optimizer shards
    TAG/recipe.yaml      the resolved recipe         } written by rank 0 after every rank
    TAG/tokenizer.model  the SentencePiece model     } finished its shards, meta.json last
    TAG/meta.json        samples seen, step, phase, world size, precision, ZeRO stage
    latest               the newest complete TAG, replaced atomically after meta.json exists

A rank killed while saving leaves a TAG without meta.json that `latest` never names, so
`resume=auto` cannot pick it; the next save of the same tag overwrites it.

A run resumed on another number of ranks reads a universal copy of its checkpoint
(OUTPUT_DIR/checkpoints_universal/TAG, made once by DeepSpeed's ds_to_universal), since ZeRO's
optimizer shards are cut per rank.

Resume, init_from, eval and export name a checkpoint the same way (`resolve`): OUTPUT_DIR,
OUTPUT_DIR/checkpoints (the tag its `latest` names) or a tag directory. Read as a model, a
checkpoint directory is consolidated with DeepSpeed's own ZeRO-to-fp32 utility (ZeRO-1/2/3, any
world size), which needs no process group. An exported file (`flip-ds export`) is one safetensors
file: the fp32 weights, with the recipe (YAML), the SentencePiece model (base64) and the
checkpoint's meta.json in its metadata, so it is self-contained and loads without DeepSpeed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from flip_ds.config import Recipe, load_recipe
from flip_ds.config_loader import ConfigError, UsageError, from_dict, to_dict
from flip_ds.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from flip_ds.distributed import barrier
from flip_ds.models.flip import FLIP, build_model

META = "meta.json"
EXPORT_FORMAT = "flip-ds"
EXPORT_VERSION = "1"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
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
        # the stage the shards are laid out for: a resume under ZeRO stage "auto" keeps it (flip_ds.zero_auto)
        meta = {**meta, "zero_stage": engine.zero_optimization_stage()}
        write_atomic(tag_dir / META, json.dumps(meta, indent=2))
        write_atomic(root / "latest", tag)
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


# -- finding a checkpoint ------------------------------------------------------------------------
def resolve(path: Path) -> tuple[Path, str]:
    """(DeepSpeed save_dir, tag) of the checkpoint at `path`: OUTPUT_DIR or OUTPUT_DIR/checkpoints
    (the tag its `latest` names), or a tag directory. Every reader of checkpoints finds them here."""
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            tag = (root / "latest").read_text().strip()
            if not is_complete(root / tag):
                raise UsageError(f"checkpoint '{root}': 'latest' names '{tag}', which is incomplete (no {META}); "
                                 "name a complete tag directory instead")
            return root, tag
    if is_complete(path):
        return path.parent, path.name
    raise UsageError(f"'{path}' is not a flip-ds checkpoint: expected OUTPUT_DIR, OUTPUT_DIR/checkpoints "
                     f"(with a 'latest' file) or OUTPUT_DIR/checkpoints/TAG (with {META})")


def find_resume(recipe: Recipe, root: Path) -> tuple[Path, str] | None:
    """(save_dir, tag) to resume from per `recipe.resume`, or None to start fresh; `root` is this
    run's OUTPUT_DIR/checkpoints, which `auto` resumes from once it holds a checkpoint."""
    if recipe.resume == "none":
        return None
    if recipe.resume == "auto":
        return resolve(root) if (root / "latest").is_file() else None
    try:
        return resolve(Path(recipe.resume))
    except UsageError as e:  # a recipe value names the path: say which key
        raise ConfigError(f"resume: {e}") from None


def kept_tags(global_batch: int, milestones: list[int], phase_ends: list[int]) -> set[str]:
    """The tags `prune` never deletes: every phase's last step (`phase_ends`, in steps: the end of
    the masked phase is what ablations of the unmasked tuning start from) and the first step that
    reaches each of `milestones` (in samples)."""
    return {tag_for(step) for step in phase_ends} | {tag_for(-(-m // global_batch)) for m in milestones}


def prune(root: Path, keep_last: int, milestones: set[str]) -> None:
    """Delete complete periodic checkpoints beyond the newest `keep_last`; milestones stay."""
    tags = sorted(p.name for p in root.glob("step_*") if is_complete(p) and p.name not in milestones)
    for tag in tags[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)


# -- reading a checkpoint back as a model --------------------------------------------------------
@dataclass
class Checkpoint:
    """Everything a trained model is made of, independent of where it was read from."""

    state_dict: dict[str, torch.Tensor]
    recipe: Recipe
    tokenizer_model: bytes  # the SentencePiece .model file's bytes
    meta: dict[str, Any]  # the checkpoint's meta.json (samples_seen, step, phase, ...)
    source: str


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The model in a checkpoint directory (any path `resolve` takes) or an exported file."""
    path = Path(path)
    if path.is_dir():
        return _consolidate(path)
    if path.is_file():
        return _read_export(path)
    raise UsageError(f"checkpoint '{path}' does not exist")


def _consolidate(path: Path) -> Checkpoint:
    root, tag = resolve(path)  # before importing DeepSpeed: a wrong path fails at once
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = root / tag
    # DeepSpeed reports its progress with print(); keep stdout for our own results.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise UsageError(f"checkpoint '{tag_dir}' cannot be consolidated by DeepSpeed's zero_to_fp32 "
                             f"(a ZeRO-1/2/3 checkpoint is needed): {e}") from None
    state.update(_untrained_params(tag_dir, state))
    return Checkpoint(state_dict=state, recipe=load_recipe(str(tag_dir / "recipe.yaml")),
                      tokenizer_model=(tag_dir / "tokenizer.model").read_bytes(),
                      meta=read_meta(root, tag), source=str(tag_dir))


def _untrained_params(tag_dir: Path, consolidated: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters zero_to_fp32 leaves out of a ZeRO-1 checkpoint: those that do not train (FLIP's
    fixed sin-cos position table). DeepSpeed records them for its consolidation only under ZeRO-2/3;
    ZeRO-1/2 save the whole module in one model file, which holds them as the run computed with them."""
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():  # ZeRO-3: one model file per rank, and the frozen parameters consolidated
        return {}
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {name: value.float() for name, value in module.items() if name not in consolidated}


def _read_export(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:
                raise UsageError(f"'{path}' is a safetensors file but not a flip-ds export (a timm vision-only "
                                 "file cannot be loaded as a FLIP model)")
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise UsageError(f"'{path}' is not a safetensors file: {e}") from None
    return Checkpoint(state_dict=state, recipe=from_dict(Recipe, yaml.safe_load(metadata["recipe"])),
                      tokenizer_model=base64.b64decode(metadata["tokenizer"]),
                      meta=json.loads(metadata.get("meta", "{}")), source=metadata.get("source", str(path)))


def build_from(ckpt: Checkpoint, device: str | torch.device = "cpu") -> tuple[FLIP, Tokenizer]:
    """The checkpoint's model (eval mode, fp32, on `device`) and tokenizer."""
    tokenizer = Tokenizer(ckpt.tokenizer_model, ckpt.recipe.model.context_length)
    model = build_model(ckpt.recipe.model, tokenizer.vocab_size, pad_id=PAD_ID, eos_id=EOS_ID)
    where = f"'{ckpt.source}' does not match its recipe's model ({ckpt.recipe.model.name})"
    try:
        result = model.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as e:  # shapes differ
        raise UsageError(f"{where}: {' '.join(str(e).split())[:300]}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise UsageError(f"{where}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    return model.to(device).eval(), tokenizer


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[FLIP, Tokenizer, Recipe]:
    """(FLIP model in eval mode, fp32 on `device`; its Tokenizer; its Recipe) from an exported
    safetensors file or a DeepSpeed checkpoint (OUTPUT_DIR, OUTPUT_DIR/checkpoints or a tag dir)."""
    ckpt = read_checkpoint(path)
    model, tokenizer = build_from(ckpt, device)
    return model, tokenizer, ckpt.recipe
