"""The model section of a recipe and the registry of FLIP's sizes (DESIGN.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from flip_ds.config_loader import check


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` patches FLIP's masking keeps (rounded down, as MAE does)."""
    return int(num_patches * (1.0 - mask_ratio))


@dataclass(frozen=True)
class TowerSizes:
    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    embed_dim: int
    mlp_ratio: float = 4.0


# FLIP's widths / depths / heads / embed dims; `tiny` is ours, sized to learn the built-in
# dataset on a laptop CPU in minutes.
REGISTRY: dict[str, TowerSizes] = {
    "tiny": TowerSizes(64, 8, 128, 4, 4, 128, 4, 4, 128),
    "B/16": TowerSizes(224, 16, 768, 12, 12, 512, 12, 8, 512),
    "L/16": TowerSizes(224, 16, 1024, 24, 16, 768, 12, 12, 768),
    "L/14": TowerSizes(224, 14, 1024, 24, 16, 768, 12, 12, 768),
    "H/14": TowerSizes(224, 14, 1280, 32, 16, 1024, 24, 16, 1024),
}


@dataclass
class ModelConfig:
    name: str = "B/16"
    image_size: int | None = None  # None: the registry's resolution for `name`
    pos_embed: Literal["sincos", "learned"] = "sincos"  # FLIP: fixed 2-D sin-cos
    pool: Literal["avg", "cls"] = "avg"  # FLIP: mean over all tokens incl. CLS; OpenCLIP: cls
    text_attention: Literal["bidirectional", "causal"] = "bidirectional"  # FLIP: bidirectional, pool token 0
    context_length: int = 32
    # which text tokens a phase's text_mask_ratio drops: any (`random`) or padding before words
    # (`pad_first`), FLIP's Table 2 ablation; the paper recipes mask no text
    text_mask: Literal["random", "pad_first"] = "random"
    # FLIP learns log(1/tau) from tau = 0.07, clipped so that tau stays in [0.01, 1]
    temperature_init: float = 0.07
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    activation_checkpointing: bool = True  # torch.utils.checkpoint around every block, both towers
    # attention kernels: `auto` picks per phase (flip_ds.models.attention: timm's eager path for
    # masked bf16 steps on a CPU, SDPA elsewhere); `sdpa` or `eager` force one
    attention: Literal["auto", "sdpa", "eager"] = "auto"

    moved_keys: ClassVar[dict[str, str]] = {
        "text_mask_ratio": "text masking is set per phase: phases[i].text_mask_ratio",
    }

    def validate(self, prefix: str = "model") -> None:
        check(self.name in REGISTRY,
              f"{prefix}.name: '{self.name}' is not a model; choose one of {', '.join(REGISTRY)}")
        sizes = REGISTRY[self.name]
        size = self.resolved_image_size
        check(size > 0 and size % sizes.patch_size == 0,
              f"{prefix}.image_size: {size} is not a positive multiple of the patch size {sizes.patch_size}")
        check(self.context_length >= 2, f"{prefix}.context_length: {self.context_length} must be at least 2")
        check(0.0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
              f"{prefix}.temperature_init: need 0 < temperature_min <= temperature_init <= temperature_max, "
              f"got {self.temperature_min} / {self.temperature_init} / {self.temperature_max}")

    @property
    def sizes(self) -> TowerSizes:
        return REGISTRY[self.name]

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or REGISTRY[self.name].image_size

    @property
    def num_patches(self) -> int:
        return (self.resolved_image_size // self.sizes.patch_size) ** 2

    def image_tokens(self, mask_ratio: float) -> int:
        """Tokens the image encoder sees at `mask_ratio`: the kept patches plus CLS."""
        return kept_patches(self.num_patches, mask_ratio) + 1
