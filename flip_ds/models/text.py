"""FLIP's text tower: a transformer over SentencePiece ids.

Bidirectional (FLIP's default) attends only to real tokens through a padding mask and pools at
token 0 (the BOS id the tokenizer puts first). Causal (CLIP's style) pools at the EOS token.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


class TextTransformer(nn.Module):
    def __init__(self, *, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, attention: str, pad_id: int, eos_id: int,
                 activation_checkpointing: bool) -> None:
        super().__init__()
        self.causal = attention == "causal"
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
        """Pooled features (N, width) of `tokens` (N, L) padded with `pad_id`.

        With `mask_ratio` > 0 that share of the real tokens after token 0 is hidden from attention
        (FLIP's paper ablates text masking; its code never had it).
        """
        valid = tokens != self.pad_id
        if mask_ratio > 0.0:
            valid = valid & ~self._random_token_mask(valid, mask_ratio, generator)
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        # Bidirectional: (N, 1, 1, L) says which keys each query may attend to. Causal: pads sit
        # after EOS, so the EOS query we pool never sees them; masked tokens must be hidden too.
        is_causal = self.causal and mask_ratio == 0.0
        attn_mask = None if is_causal else valid[:, None, None, :]
        if self.causal and not is_causal:
            length = tokens.shape[1]
            attn_mask = attn_mask & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=attn_mask, is_causal=is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm(x)
        if self.causal:
            eos_at = (tokens == self.eos_id).int().argmax(dim=1)
            return x[torch.arange(x.shape[0], device=x.device), eos_at]
        return x[:, 0]

    @staticmethod
    def _random_token_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
        """True for `int(n_real * ratio)` random real tokens per row, never token 0."""
        noise = torch.rand(valid.shape, device=valid.device, generator=generator)
        noise = noise.masked_fill(~valid, 2.0)
        noise[:, 0] = 2.0
        ranks = noise.argsort(dim=1).argsort(dim=1)
        n_drop = ((valid.sum(dim=1, keepdim=True) - 1).clamp(min=0) * ratio).long()
        return ranks < n_drop
