"""FLIP's image tower: a timm VisionTransformer that encodes only a random subset of its patches."""

from __future__ import annotations

import math

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from flip_ds.models.config import kept_patches, mlp_width


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a random `int(L * (1 - mask_ratio))` tokens of each sample (FLIP / MAE).

    `x` is (N, L, D). Each sample gets its own subset: uniform noise per token, drawn on `x`'s
    device from `generator` (so the mask is reproducible from a seed and no host sync happens),
    sorted, and the lowest-noise tokens gathered in one indexing op. The kept tokens are returned
    in their original order, so they stay contiguous in memory for the encoder.
    """
    n, length, dim = x.shape
    keep = kept_patches(length, mask_ratio)
    noise = torch.rand(n, length, device=x.device, generator=generator)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))


def masked_preview(images: torch.Tensor, patch_size: int, mask_ratio: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """`images` with the patches that `random_masking` would drop blacked out (for TensorBoard)."""
    n, _, h, w = images.shape
    grid_w = w // patch_size
    positions = torch.arange(h // patch_size * grid_w, dtype=torch.float32, device=images.device)
    kept = random_masking(positions.expand(n, -1).unsqueeze(-1), mask_ratio, generator).squeeze(-1).long()
    visible = torch.zeros(n, positions.numel(), device=images.device).scatter_(1, kept, 1.0)
    visible = visible.view(n, 1, h // patch_size, grid_w)
    visible = visible.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return images * visible


class MaskedViT(VisionTransformer):
    """timm's ViT with FLIP's token dropping; its state dict stays loadable by timm.

    Built with `no_embed_class=True`: the position embedding covers the patch grid only and is
    added before masking; the CLS token is prepended after masking and is never dropped.
    """

    def __init__(self, *, img_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, pos_embed: str, pool: str, activation_checkpointing: bool) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool="",
                         class_token=True, no_embed_class=True, qkv_bias=True)
        self.pool = pool
        self.activation_checkpointing = activation_checkpointing
        if pos_embed == "sincos":
            grid = self.patch_embed.grid_size
            table = build_sincos2d_pos_embed(list(grid), dim=width, temperature=10000.0)
            self.pos_embed.data.copy_(table.reshape(1, grid[0] * grid[1], width))
            self.pos_embed.requires_grad_(False)  # FLIP keeps the 2-D sin-cos table fixed

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Pooled features (N, width) of `images` with `mask_ratio` of the patches dropped."""
        x = self.patch_embed(images) + self.pos_embed  # timm's PatchEmbed refuses other sizes than built for
        if mask_ratio > 0.0:
            x = random_masking(x, mask_ratio, generator)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        return x.mean(dim=1) if self.pool == "avg" else x[:, 0]


def mlp_ratio_for(width: int, hidden: int) -> float:
    """The mlp_ratio from which timm builds exactly `hidden` MLP features for `width`.

    timm takes int(width * mlp_ratio), and hidden / width can land one ulp low (28 wide, 61
    features: 60.99999...), which would build a tower one feature short; so step up to the
    first float that rounds to `hidden`.
    """
    ratio = hidden / width
    while mlp_width(width, ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def timm_kwargs(model: MaskedViT) -> dict[str, object]:
    """Arguments that make `timm.create_model('vit_base_patch16_224', **kwargs)` compute `model`'s
    unmasked features and accept its state dict with strict=True.

    FLIP's 'avg' pool is the mean over all tokens, CLS included, after the final norm; timm's
    'avg' would drop CLS (pool_include_prefix) and move the norm after the pool (fc_norm).
    Block-level choices timm variants differ on are pinned too, so any vit_* name works.
    """
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                mlp_ratio=mlp_ratio_for(model.embed_dim, model.blocks[0].mlp.fc1.out_features), num_classes=0,
                global_pool="avg" if model.pool == "avg" else "token", pool_include_prefix=model.pool == "avg",
                fc_norm=False, class_token=True, no_embed_class=True, qkv_bias=True, pre_norm=False)
