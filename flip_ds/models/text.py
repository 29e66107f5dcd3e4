"""FLIP's text tower: a transformer over SentencePiece ids.

Bidirectional (FLIP's default) attends only to real tokens through a padding mask and pools at
token 0 (the BOS id the tokenizer puts first). Causal (CLIP's style) pools at the EOS token.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


def kept_tokens(length: int, mask_ratio: float) -> int:
    """How many of `length` text tokens text masking keeps: as for patches, never fewer than the pooled one."""
    return max(1, int(length * (1.0 - mask_ratio)))


def drop_tokens(x: torch.Tensor, valid: torch.Tensor, keep_at: torch.Tensor, mask_ratio: float, pad_first: bool,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep `kept_tokens(L, mask_ratio)` tokens of each row of `x` (N, L, D), in their order (FLIP's
    text-masking ablation, its Table 2): the tower then runs on the shorter sequence.

    Random noise ranks the tokens; the token at `keep_at` (N,) (the one the tower pools) always
    stays. `pad_first` ranks padding (`~valid`) after every real token, so pads are dropped before
    any word. Returns the kept tokens, their `valid` flags and the new position of `keep_at`.
    """
    n, length, dim = x.shape
    noise = torch.rand(n, length, device=x.device, generator=generator)
    if pad_first:
        noise = noise + (~valid).to(noise.dtype)  # in [1, 2): after every real token's [0, 1)
    rows = torch.arange(n, device=x.device)
    noise[rows, keep_at] = -1.0
    ids_keep = noise.argsort(dim=1)[:, :kept_tokens(length, mask_ratio)].sort(dim=1).values
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    return x, torch.gather(valid, 1, ids_keep), (ids_keep == keep_at[:, None]).int().argmax(dim=1)


class TextTransformer(nn.Module):
    def __init__(self, *, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, attention: str, text_mask: str, pad_id: int, eos_id: int,
                 activation_checkpointing: bool) -> None:
        super().__init__()
        self.causal = attention == "causal"
        self.pad_first = text_mask == "pad_first"
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.activation_checkpointing = activation_checkpointing
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Pooled features (N, width) of `tokens` (N, L) padded with `pad_id`; with `mask_ratio` > 0
        that share of the L tokens is dropped (`drop_tokens`) after the position embedding is added."""
        valid = tokens != self.pad_id
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        pool_at = (tokens == self.eos_id).int().argmax(dim=1) if self.causal else torch.zeros_like(rows)
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        if mask_ratio > 0.0:
            x, valid, pool_at = drop_tokens(x, valid, pool_at, mask_ratio, self.pad_first, generator)
        # Causal: pads sit after EOS, so the EOS query we pool never sees them, dropped or not.
        # Bidirectional: (N, 1, 1, L) says which keys each query may attend to.
        attn_mask = None if self.causal else valid[:, None, None, :]
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=attn_mask, is_causal=self.causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=self.causal)
        return self.norm(x)[rows, pool_at]
