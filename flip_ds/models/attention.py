"""Which attention implementation the towers run: torch's SDPA kernels or timm's eager path.

`model.attention: auto` resolves per phase, since the choice depends on the phase's image length:
on a CPU in bf16, timm's eager path (q @ k^T, softmax, @ v, all in bf16) trains faster than SDPA,
whose flash kernel has a slow bf16 backward and whose math kernel upcasts q, k and v to fp32
(docs/benchmarks.md, "Attention path"), at every length up to the longest unmasked one of the
registry (257 tokens). Longer sequences keep the flash kernel: the score matrices eager saves grow
with the square of the length. fp32 and GPUs keep SDPA. The eager path rounds the scores to bf16
before the softmax, as any eager bf16 or autocast attention does. The text tower follows the image
tower's path. The path is a setting of the model, left in place through the backward, because
activation checkpointing re-runs the forward there.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers.attention import Attention
from torch import nn

# On a CPU in bf16, up to this many image tokens (kept patches + CLS) take timm's eager attention:
# the unmasked length of the /14 models at 224 px (B/16: 50, 99 and 197 tokens all eager).
EAGER_MAX_TOKENS = 257

AttentionPath = Literal["sdpa", "eager"]
ATTENTION_SETTINGS = ("auto", "sdpa", "eager")  # model.attention's values


def resolve_attention(setting: str, device: str, dtype: torch.dtype, image_tokens: int) -> AttentionPath:
    """The path `setting` ('auto', 'sdpa' or 'eager') means for a phase whose image tower sees
    `image_tokens` tokens, trained in `dtype` on `device`."""
    if setting != "auto":
        return setting
    eager = device == "cpu" and dtype == torch.bfloat16 and image_tokens <= EAGER_MAX_TOKENS
    return "eager" if eager else "sdpa"


def use_attention(model: nn.Module, path: AttentionPath) -> None:
    """Every timm attention layer of `model` on `path` until the next call."""
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.fused_attn = path == "sdpa"
