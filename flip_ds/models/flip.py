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
                                depth=s.vision_depth, heads=s.vision_heads, mlp_ratio=s.vision_mlp_ratio,
                                pos_embed=cfg.pos_embed, pool=cfg.pool,
                                activation_checkpointing=cfg.activation_checkpointing)
        self.text = TextTransformer(vocab_size=vocab_size, context_length=cfg.context_length, width=s.text_width,
                                    depth=s.text_depth, heads=s.text_heads, mlp_ratio=s.text_mlp_ratio,
                                    attention=cfg.text_attention, text_mask=cfg.text_mask, pad_id=pad_id, eos_id=eos_id,
                                    activation_checkpointing=cfg.activation_checkpointing)
        self.visual_proj = nn.Linear(s.vision_width, s.embed_dim, bias=False)
        self.text_proj = nn.Linear(s.text_width, s.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=s.vision_width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=s.text_width**-0.5)
        # FLIP's learnable logit scale log(1/tau), clipped in forward (never in place: under ZeRO an
        # in-place clamp after the step would touch a copy, not the master weight). Shape (1,), not
        # 0-dim: DeepSpeed ZeRO's broadcast views parameters as bytes, which fails on 0-dim tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature_init)))
        # Under bf16 the parameter is a bf16 copy: at log-scale ~4.6 its spacing is 0.031, so tau
        # would move in 3% jumps. The engine puts the optimizer's fp32 master value here after each
        # update (flip_ds.engine.refresh_fp32_logit_scale) and forward computes with that value.
        self.fp32_logit_scale: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        """1/tau in fp32, clipped to FLIP's range; call it inside forward (ZeRO-3 frees the param outside).

        With an fp32 master value the forward takes its value and the gradient still flows to the
        parameter (a straight-through sum), so the loss sees tau as FLIP's fp32 training does.
        """
        raw = self.logit_scale.float()
        if self.fp32_logit_scale is not None and self.logit_scale.dtype != torch.float32:
            raw = raw + (self.fp32_logit_scale.to(raw.device) - raw).detach()
        lo, hi = -math.log(self.cfg.temperature_max), -math.log(self.cfg.temperature_min)
        return raw.clamp(lo, hi).exp()

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
        """(image embeddings, text embeddings, logit scale 1/tau in fp32), embeddings L2-normalised."""
        image_emb = self.encode_image(images, image_mask_ratio, generator)
        text_emb = self.encode_text(tokens, text_mask_ratio, generator)
        return image_emb, text_emb, self.scale()


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int = 0, eos_id: int = 3) -> FLIP:
    return FLIP(cfg, vocab_size, pad_id=pad_id, eos_id=eos_id)


def decay_exempt(model: FLIP, rule: str) -> set[str]:
    """Names of the parameters weight decay spares under `rule` (the recipe's optim.no_decay).

    `flip` (FLIP's released code: its bias-and-norm and position-embedding filters): biases, norm
    weights and position embeddings; CLS and the logit scale are decayed.
    `openclip` (OpenCLIP's `p.ndim < 2 or bias / ln / logit_scale`): biases, norm weights, CLS
    and the logit scale; its position embeddings are decayed.
    """
    norms = {f"{owner}.{name}" for owner, module in model.named_modules() if isinstance(module, nn.LayerNorm)
             for name, _ in module.named_parameters(recurse=False)}
    biases = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    by_role = {"flip": {"visual.pos_embed", "text.pos_embed"}, "openclip": {"visual.cls_token", "logit_scale"}}
    return norms | biases | by_role[rule]
