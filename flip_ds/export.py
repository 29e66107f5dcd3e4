"""Export a checkpoint: the whole model as one self-contained safetensors file, and the vision tower
as a timm VisionTransformer state dict for fine-tuning with timm."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from flip_ds.checkpoint import EXPORT_FORMAT, EXPORT_VERSION, Checkpoint, build_from
from flip_ds.config_loader import UsageError, to_dict
from flip_ds.models.vision import timm_kwargs

TIMM_MODEL = "vit_base_patch16_224"  # any vit_* name works: the kwargs set the whole architecture


def export_model(ckpt: Checkpoint, out: Path) -> None:
    """fp32 weights, with the recipe, tokenizer and meta in the metadata (what `flip_ds.load` needs)."""
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "recipe": yaml.safe_dump(to_dict(ckpt.recipe), sort_keys=False),
        "tokenizer": base64.b64encode(ckpt.tokenizer_model).decode("ascii"),
        "meta": json.dumps(ckpt.meta),
        "source": ckpt.source,
    }
    _save({k: v.contiguous() for k, v in ckpt.state_dict.items()}, out, metadata)


def export_timm(ckpt: Checkpoint, out: Path) -> dict[str, object]:
    """The vision tower's weights under timm's VisionTransformer names; returns create_model's kwargs.

    MaskedViT is a timm VisionTransformer, so its keys are timm's; they are checked against a
    timm model built on the meta device (no memory), so a timm that renamed something fails here,
    not at the user's load.
    """
    import timm

    model, _ = build_from(ckpt)
    kwargs = timm_kwargs(model.visual)
    state = {k: v.contiguous() for k, v in model.visual.state_dict().items()}
    with torch.device("meta"):
        reference = timm.create_model(TIMM_MODEL, pretrained=False, **kwargs)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise UsageError(f"the vision tower does not match timm {timm.__version__}'s {TIMM_MODEL} "
                         f"with {kwargs}: differing (key, shape) {diff}")
    _save(state, out, {"format": "timm", "timm_model": TIMM_MODEL, "timm_kwargs": json.dumps(kwargs),
                       "source": ckpt.source})
    return kwargs


def timm_create_call(kwargs: dict[str, object], path: Path) -> str:
    """Python that rebuilds the exported tower in timm."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"model = timm.create_model({TIMM_MODEL!r}, pretrained=False, {args})\n"
            f"model.load_state_dict(safetensors.torch.load_file({str(path)!r}), strict=True)")


def _save(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # a crash mid-write leaves no half file under the real name
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
