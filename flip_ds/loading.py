"""`flip_ds.load(path)`, implemented here: a trained FLIP model, tokenizer and recipe, from an export or checkpoint.

An exported file (`flip-ds export`) is one safetensors file: the fp32 weights, with the recipe
(YAML), the SentencePiece model (base64) and the checkpoint's meta.json in its metadata, so it
is self-contained and loads without DeepSpeed. A checkpoint directory is consolidated with
DeepSpeed's own ZeRO-to-fp32 utility (ZeRO-1/2/3, any world size), which needs no process group.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from flip_ds.config import Recipe, load_recipe
from flip_ds.config_loader import ConfigError, from_dict
from flip_ds.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from flip_ds.models.flip import FLIP, build_model

EXPORT_FORMAT = "flip-ds"
EXPORT_VERSION = "1"


@dataclass
class Checkpoint:
    """Everything a trained model is made of, independent of where it was read from."""

    state_dict: dict[str, torch.Tensor]
    recipe: Recipe
    tokenizer_model: bytes  # the SentencePiece .model file's bytes
    meta: dict[str, Any]  # the checkpoint's meta.json (samples_seen, step, phase, ...)
    source: str


def resolve_checkpoint_dir(path: Path) -> tuple[Path, str]:
    """(DeepSpeed save_dir, tag) for OUTPUT_DIR, OUTPUT_DIR/checkpoints (its `latest`) or a tag directory."""
    from flip_ds.checkpoint import META, is_complete

    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            tag = (root / "latest").read_text().strip()
            if not is_complete(root / tag):
                raise ConfigError(f"checkpoint '{root}': 'latest' names '{tag}', which is incomplete (no {META})")
            return root, tag
    if is_complete(path):
        return path.parent, path.name
    raise ConfigError(f"'{path}' is not a flip-ds checkpoint: expected OUTPUT_DIR, OUTPUT_DIR/checkpoints "
                      f"(with a 'latest' file) or OUTPUT_DIR/checkpoints/TAG (with {META})")


def read_checkpoint_dir(path: Path) -> Checkpoint:
    root, tag = resolve_checkpoint_dir(path)  # before importing DeepSpeed: a wrong path fails at once
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = root / tag
    # DeepSpeed reports its progress with print(); keep stdout for our own results.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"checkpoint '{tag_dir}' cannot be consolidated by DeepSpeed's zero_to_fp32 "
                              f"(a ZeRO-1/2/3 checkpoint is needed): {e}") from None
    return Checkpoint(state_dict=state, recipe=load_recipe(str(tag_dir / "recipe.yaml")),
                      tokenizer_model=(tag_dir / "tokenizer.model").read_bytes(),
                      meta=json.loads((tag_dir / "meta.json").read_text()), source=str(tag_dir))


def read_export(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:
                raise ConfigError(f"'{path}' is a safetensors file but not a flip-ds export (a timm vision-only "
                                  "file cannot be loaded as a FLIP model)")
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ConfigError(f"'{path}' is not a safetensors file: {e}") from None
    return Checkpoint(state_dict=state, recipe=from_dict(Recipe, yaml.safe_load(metadata["recipe"])),
                      tokenizer_model=base64.b64decode(metadata["tokenizer"]),
                      meta=json.loads(metadata.get("meta", "{}")), source=metadata.get("source", str(path)))


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        return read_checkpoint_dir(path)
    if path.is_file():
        return read_export(path)
    raise ConfigError(f"checkpoint '{path}' does not exist")


def build_from(ckpt: Checkpoint, device: str | torch.device = "cpu") -> tuple[FLIP, Tokenizer]:
    tokenizer = Tokenizer(ckpt.tokenizer_model, ckpt.recipe.model.context_length)
    model = build_model(ckpt.recipe.model, tokenizer.vocab_size, pad_id=PAD_ID, eos_id=EOS_ID)
    where = f"'{ckpt.source}' does not match its recipe's model ({ckpt.recipe.model.name})"
    try:
        result = model.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as e:  # shapes differ
        raise ConfigError(f"{where}: {' '.join(str(e).split())[:300]}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise ConfigError(f"{where}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    return model.to(device).eval(), tokenizer


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[FLIP, Tokenizer, Recipe]:
    """(FLIP model in eval mode, fp32 on `device`; its Tokenizer; its Recipe) from an exported
    safetensors file or a DeepSpeed checkpoint (OUTPUT_DIR, OUTPUT_DIR/checkpoints or a tag dir)."""
    ckpt = read_checkpoint(path)
    model, tokenizer = build_from(ckpt, device)
    return model, tokenizer, ckpt.recipe
