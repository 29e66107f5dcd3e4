"""The model section of a recipe and the registry of FLIP's sizes (DESIGN.md section 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from flip_ds.config_loader import check, from_dict, read_yaml


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` patches FLIP's masking keeps (rounded down, as MAE does)."""
    return int(num_patches * (1.0 - mask_ratio))


def mlp_width(width: int, mlp_ratio: float) -> int:
    """Hidden features of a block's MLP: int(width * mlp_ratio), timm's rounding (g/14: 6144)."""
    return int(width * mlp_ratio)


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
    vision_mlp_ratio: float = 4.0
    text_mlp_ratio: float = 4.0


# FLIP's widths / depths / heads / embed dims, plus OpenCLIP's S/16, B/32 and g/14 (its
# model_configs; g/14's vision MLP is timm's vit_giant_patch14, 6144 = 1408 x 48/11, its text
# MLP the usual 4x); `tiny` is ours, sized to learn the built-in dataset on a laptop CPU in minutes.
REGISTRY: dict[str, TowerSizes] = {
    "tiny": TowerSizes(64, 8, 128, 4, 4, 128, 4, 4, 128),
    "S/16": TowerSizes(224, 16, 384, 12, 6, 384, 12, 6, 384),
    "B/32": TowerSizes(224, 32, 768, 12, 12, 512, 12, 8, 512),
    "B/16": TowerSizes(224, 16, 768, 12, 12, 512, 12, 8, 512),
    "L/16": TowerSizes(224, 16, 1024, 24, 16, 768, 12, 12, 768),
    "L/14": TowerSizes(224, 14, 1024, 24, 16, 768, 12, 12, 768),
    "H/14": TowerSizes(224, 14, 1280, 32, 16, 1024, 24, 16, 1024),
    "g/14": TowerSizes(224, 14, 1408, 40, 16, 1024, 24, 16, 1024, vision_mlp_ratio=48 / 11),
}
CUSTOM_IMAGE_SIZE = 224  # a shape of one's own that names no image_size: every paper size's resolution


@dataclass
class VisionShape:
    """The image tower's sizes as a recipe spells them (`model.vision`); None: not given."""

    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None  # None: 4; the MLP has int(width * mlp_ratio) features, as in timm

    def validate(self, prefix: str = "model.vision") -> None:
        check_positive(self, prefix)


@dataclass
class TextShape:
    """The text tower's sizes as a recipe spells them (`model.text`); None: not given."""

    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None  # None: 4

    def validate(self, prefix: str = "model.text") -> None:
        check_positive(self, prefix)


def check_positive(shape: VisionShape | TextShape, prefix: str) -> None:
    for key, value in dataclasses.asdict(shape).items():
        check(value is None or value > 0, f"{prefix}.{key}: {value} must be > 0")


def check_tower(prefix: str, width: int, heads: int, mlp_ratio: float) -> None:
    """What timm's blocks need of a tower's sizes: heads that split the width, an MLP of a feature or more."""
    check(width % heads == 0, f"{prefix}.heads: width {width} does not split into {heads} heads "
                              f"(remainder {width % heads})")
    check(mlp_width(width, mlp_ratio) >= 1, f"{prefix}.mlp_ratio: {mlp_ratio} leaves a {width}-wide MLP no features")


# recipe key (under `model.`) -> the TowerSizes field it sets
SHAPE_KEYS: dict[str, str] = {
    "vision.patch_size": "patch_size", "vision.width": "vision_width", "vision.depth": "vision_depth",
    "vision.heads": "vision_heads", "vision.mlp_ratio": "vision_mlp_ratio",
    "text.width": "text_width", "text.depth": "text_depth", "text.heads": "text_heads",
    "text.mlp_ratio": "text_mlp_ratio", "embed_dim": "embed_dim",
}
OPTIONAL_SHAPE_KEYS = ("vision.mlp_ratio", "text.mlp_ratio")  # TowerSizes' defaults (4) stand in


@dataclass
class ModelConfig:
    # `name` is a registry size, or a label of one's own for the shape that `vision`, `text` and
    # `embed_dim` then spell out in full. Sizes given beside a registry name must agree with it,
    # so a checkpoint, a log or a plan that says B/16 is B/16. The towers are nested, as OpenCLIP's
    # vision_cfg / text_cfg, so both read alike: `model.vision.width=512`, `model.text.width=512`.
    name: str = "B/16"
    image_size: int | None = None  # None: the registry's resolution for `name` (224 for a shape of one's own)
    vision: VisionShape = field(default_factory=VisionShape)
    text: TextShape = field(default_factory=TextShape)
    embed_dim: int | None = None  # the shared embedding both towers project to
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
    # bf16 steps on a CPU up to 257 image tokens, SDPA elsewhere); `sdpa` or `eager` force one
    attention: Literal["auto", "sdpa", "eager"] = "auto"

    moved_keys: ClassVar[dict[str, str]] = {
        "text_mask_ratio": "text masking is set per phase: phases[i].text_mask_ratio",
    }

    @classmethod
    def of_shape(cls, name: str, sizes: TowerSizes, **settings: object) -> ModelConfig:
        """A config named `name` whose recipe spells out every one of `sizes` (a shape of one's own)."""
        return cls(name=name, image_size=sizes.image_size,
                   vision=VisionShape(sizes.patch_size, sizes.vision_width, sizes.vision_depth, sizes.vision_heads,
                                      sizes.vision_mlp_ratio),
                   text=TextShape(sizes.text_width, sizes.text_depth, sizes.text_heads, sizes.text_mlp_ratio),
                   embed_dim=sizes.embed_dim, **settings)

    def validate(self, prefix: str = "model") -> None:
        check(bool(self.name), f"{prefix}.name: a model needs a name (a registry size or a label of your own)")
        check(self.embed_dim is None or self.embed_dim > 0, f"{prefix}.embed_dim: {self.embed_dim} must be > 0")
        s = self.resolve_sizes(prefix)
        check_tower(f"{prefix}.vision", s.vision_width, s.vision_heads, s.vision_mlp_ratio)
        check_tower(f"{prefix}.text", s.text_width, s.text_heads, s.text_mlp_ratio)
        # the 2-D sin-cos table gives each axis a sin and a cos quarter of the width
        check(self.pos_embed != "sincos" or s.vision_width % 4 == 0,
              f"{prefix}.vision.width: {s.vision_width} is not a multiple of 4, which pos_embed 'sincos' needs "
              f"(or choose pos_embed: learned)")
        size = self.resolved_image_size
        check(size > 0 and size % s.patch_size == 0,
              f"{prefix}.image_size: {size} is not a positive multiple of the patch size {s.patch_size}")
        check(self.context_length >= 2, f"{prefix}.context_length: {self.context_length} must be at least 2")
        check(0.0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
              f"{prefix}.temperature_init: need 0 < temperature_min <= temperature_init <= temperature_max, "
              f"got {self.temperature_min} / {self.temperature_init} / {self.temperature_max}")

    def given_sizes(self) -> dict[str, float]:
        """The shape keys the recipe sets (`vision.width`: 768, ...), in SHAPE_KEYS' order."""
        values = {f"vision.{k}": v for k, v in dataclasses.asdict(self.vision).items()}
        values |= {f"text.{k}": v for k, v in dataclasses.asdict(self.text).items()}
        values["embed_dim"] = self.embed_dim
        return {key: values[key] for key in SHAPE_KEYS if values[key] is not None}

    def resolve_sizes(self, prefix: str = "model") -> TowerSizes:
        """The towers' sizes: the registry's for a registry name (sizes given beside it must agree),
        else the recipe's own, every key of SHAPE_KEYS but the MLP ratios given."""
        given = self.given_sizes()
        registered = REGISTRY.get(self.name)
        if registered is not None:
            for key, value in given.items():
                expected = getattr(registered, SHAPE_KEYS[key])
                check(value == expected, f"{prefix}.{key}: {value} conflicts with {self.name}'s {expected}; "
                                         f"a shape of your own needs a name outside the registry")
            return registered
        check(bool(given), f"{prefix}.name: '{self.name}' is not a model; choose one of {', '.join(REGISTRY)}, "
                           f"or give a shape of your own ({prefix}.vision, {prefix}.text, {prefix}.embed_dim)")
        for key in SHAPE_KEYS:
            check(key in given or key in OPTIONAL_SHAPE_KEYS,
                  f"{prefix}.{key}: missing; '{self.name}' is not a registry size, so its shape needs every size")
        return TowerSizes(image_size=CUSTOM_IMAGE_SIZE, **{SHAPE_KEYS[key]: value for key, value in given.items()})

    @property
    def sizes(self) -> TowerSizes:
        return self.resolve_sizes()

    @property
    def resolved_image_size(self) -> int:
        return self.sizes.image_size if self.image_size is None else self.image_size

    @property
    def num_patches(self) -> int:
        return (self.resolved_image_size // self.sizes.patch_size) ** 2

    def image_tokens(self, mask_ratio: float) -> int:
        """Tokens the image encoder sees at `mask_ratio`: the kept patches plus CLS."""
        return kept_patches(self.num_patches, mask_ratio) + 1


def model_section(path: str) -> dict[str, Any]:
    """The `model` section of the YAML file at `path`: a whole recipe, or a file holding only that
    section (how `model-info` and `bench` take a shape of one's own)."""
    section = read_yaml(path).get("model")
    check(isinstance(section, dict), f"recipe '{path}' has no model section (model: name, vision, text, embed_dim ...)")
    from_dict(ModelConfig, section, "model")  # a bad shape fails here, in one line naming the key
    return section
