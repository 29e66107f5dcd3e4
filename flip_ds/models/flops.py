"""Analytic parameter and FLOP counts of the FLIP towers (2 FLOPs per multiply-add).

Used by `model-info`, the planner and the benchmarks' MFU. Matches OpenCLIP's profile table,
which counts the same way: ViT-H/14 image tower 334.6 GFLOPs per 224-px image.
"""

from __future__ import annotations

from dataclasses import dataclass

from flip_ds.models.config import ModelConfig, mlp_width


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` pre-norm blocks over `tokens` tokens (matmuls + attention scores)."""
    hidden = mlp_width(width, mlp_ratio)  # the features the block really has
    per_block = 2 * tokens * (4 * width * width + 2 * width * hidden) + 2 * 2 * tokens * tokens * width
    return depth * per_block


@dataclass(frozen=True)
class FlopsPerSample:
    image: float
    text: float

    @property
    def forward(self) -> float:
        return self.image + self.text

    @property
    def train(self) -> float:
        """Forward + backward (2x forward); activation recomputation is not model FLOPs."""
        return 3 * self.forward


def flops_per_sample(cfg: ModelConfig, mask_ratio: float = 0.0, context_length: int | None = None) -> FlopsPerSample:
    """Model FLOPs of one image-text pair with `mask_ratio` of the patches dropped.

    Text is counted at the full context length (padding included: it is computed).
    """
    s = cfg.sizes
    patches = cfg.num_patches
    patch_embed = 2 * patches * (3 * s.patch_size**2) * s.vision_width
    image = patch_embed + transformer_forward_flops(cfg.image_tokens(mask_ratio), s.vision_width, s.vision_depth,
                                                    s.vision_mlp_ratio)
    image += 2 * s.vision_width * s.embed_dim
    ctx = context_length or cfg.context_length
    text = transformer_forward_flops(ctx, s.text_width, s.text_depth, s.text_mlp_ratio) + 2 * s.text_width * s.embed_dim
    return FlopsPerSample(image=float(image), text=float(text))
