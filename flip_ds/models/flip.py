"""The FLIP model: both towers, bias-free projections, normalised embeddings, a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flip_ds.models.config import ModelConfig
from flip_ds.models.text import TextTransformer
from flip_ds.models.vision import MaskedViT


class FLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0, eos_id: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.sizes
        self.visual = MaskedViT(img_size=cfg.resolved_image_size, patch_size=s.patch_size, width=s.vision_width,
                                depth=s.vision_depth, heads=s.vision_heads, mlp_ratio=s.mlp_ratio,
                                pos_embed=cfg.pos_embed, pool=cfg.pool,
                                activation_checkpointing=cfg.activation_checkpointing)
        self.text = TextTransformer(vocab_size=vocab_size, context_length=cfg.context_length, width=s.text_width,
                                    depth=s.text_depth, heads=s.text_heads, mlp_ratio=s.mlp_ratio,
                                    attention=cfg.text_attention, pad_id=pad_id, eos_id=eos_id,
                                    activation_checkpointing=cfg.activation_checkpointing)
        self.visual_proj = nn.Linear(s.vision_width, s.embed_dim, bias=False)
        self.text_proj = nn.Linear(s.text_width, s.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=s.vision_width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=s.text_width**-0.5)
        # Shape (1,), not 0-dim: DeepSpeed ZeRO's broadcast views parameters as bytes, which
        # fails on 0-dim tensors. Stored as log(tau) and clipped in forward, never in place:
        # under ZeRO an in-place clamp after the step would touch a copy, not the master weight.
        self.log_temperature = nn.Parameter(torch.full((1,), math.log(cfg.temperature_init)))

    def temperature(self) -> torch.Tensor:
        """tau, clipped to the recipe's range; call it inside forward (ZeRO-3 frees the param outside)."""
        lo, hi = math.log(self.cfg.temperature_min), math.log(self.cfg.temperature_max)
        return self.log_temperature.clamp(lo, hi).exp()

    def encode_image(self, images: torch.Tensor, mask_ratio: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        features = self.visual(images.to(self.visual_proj.weight.dtype), mask_ratio, generator)
        return F.normalize(self.visual_proj(features), dim=-1)

    def encode_text(self, tokens: torch.Tensor, mask_ratio: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens, mask_ratio, generator)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, image_mask_ratio: float = 0.0,
                text_mask_ratio: float = 0.0, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale 1/tau), embeddings L2-normalised."""
        image_emb = self.encode_image(images, image_mask_ratio, generator)
        text_emb = self.encode_text(tokens, text_mask_ratio, generator)
        return image_emb, text_emb, 1.0 / self.temperature()


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int = 0, eos_id: int = 3) -> FLIP:
    return FLIP(cfg, vocab_size, pad_id=pad_id, eos_id=eos_id)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """FLIP: no decay on biases, norms, position embeddings, CLS and the temperature."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "log_temperature"))
