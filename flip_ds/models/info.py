"""Parameter and FLOP figures of a model of any shape, counted on the meta device (no memory used)."""

from __future__ import annotations

import dataclasses

import torch

from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import FLIP
from flip_ds.models.flops import flops_per_sample


def as_model_config(model: str | ModelConfig, context_length: int) -> ModelConfig:
    """`model` (a registry name, or a config of any shape) with `context_length` text tokens."""
    cfg = ModelConfig(name=model) if isinstance(model, str) else model
    return dataclasses.replace(cfg, context_length=context_length)


def count_params(model: str | ModelConfig, vocab_size: int, context_length: int = 32) -> dict[str, int]:
    cfg = as_model_config(model, context_length)
    with torch.device("meta"):
        flip = FLIP(cfg, vocab_size)
    image = sum(p.numel() for p in flip.visual.parameters())
    text = sum(p.numel() for p in flip.text.parameters())
    total = sum(p.numel() for p in flip.parameters())
    return {"params_image": image, "params_text": text, "params_total": total}


def model_info(model: str | ModelConfig, vocab_size: int, context_length: int, masks: list[float]) -> dict:
    cfg = as_model_config(model, context_length)
    flops = []
    for m in masks:
        f = flops_per_sample(cfg, m)
        flops.append({"mask_ratio": m, "image_gflops": f.image / 1e9, "text_gflops": f.text / 1e9,
                      "forward_gflops": f.forward / 1e9, "train_gflops": f.train / 1e9})
    return {"model": cfg.name, **count_params(cfg, vocab_size, context_length), "vocab_size": vocab_size,
            "context_length": context_length, "image_size": cfg.resolved_image_size,
            "sizes": {k: v for k, v in dataclasses.asdict(cfg.sizes).items() if k != "image_size"}, "flops": flops}
