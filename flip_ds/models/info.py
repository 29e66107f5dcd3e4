"""Parameter and FLOP figures of a registry size, counted on the meta device (no memory used)."""

from __future__ import annotations

import torch

from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import FLIP
from flip_ds.models.flops import flops_per_sample


def count_params(name: str, vocab_size: int, context_length: int = 32) -> dict[str, int]:
    cfg = ModelConfig(name=name, context_length=context_length)
    with torch.device("meta"):
        model = FLIP(cfg, vocab_size)
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"params_image": image, "params_text": text, "params_total": total}


def model_info(name: str, vocab_size: int, context_length: int, masks: list[float]) -> dict:
    cfg = ModelConfig(name=name, context_length=context_length)
    flops = []
    for m in masks:
        f = flops_per_sample(cfg, m)
        flops.append({"mask_ratio": m, "image_gflops": f.image / 1e9, "text_gflops": f.text / 1e9,
                      "forward_gflops": f.forward / 1e9, "train_gflops": f.train / 1e9})
    return {"model": name, **count_params(name, vocab_size, context_length), "vocab_size": vocab_size,
            "context_length": context_length, "image_size": cfg.resolved_image_size, "flops": flops}
