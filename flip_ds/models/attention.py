"""Which attention implementation a training step runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from timm.layers.attention import Attention
from torch import nn

# On a CPU in bf16, up to this many tokens timm's eager attention trains faster than SDPA's kernels.
EAGER_MAX_TOKENS = 128


def training_attention(model: nn.Module, inputs: torch.Tensor, image_tokens: int) -> contextlib.AbstractContextManager:
    """The attention path for a training step of `model` on images like `inputs`, whose image tower
    sees `image_tokens` tokens (kept patches + CLS).

    On a CPU in bf16, torch's flash kernel has a slow bf16 backward and its math kernel upcasts q,
    k and v to fp32 (its matmuls miss the bf16 units, and it pays for the casts), so on masked
    lengths timm's eager path (q @ k^T, softmax, @ v, all in bf16) trains fastest. One B/16
    attention layer with its projections, forward + backward, batch 32, one thread, torch 2.14, ms,
    flash / math / eager: 50 tokens (mask 0.75) 216-228 / 143-166 / 95-102; 99 tokens (mask 0.5)
    481-505 / 450-582 / 248-314. At 197 tokens (mask 0) a whole 2-rank B/16 step is at par (eager
    14.8 s, flash 15.1 s) in a clean process, but eager fell to 18.7 s against flash's 15.6 s once
    the process had also trained another model (cause not established), so unmasked steps keep
    flash. The scores are rounded to bf16 before the softmax, as in any eager bf16 or
    autocast attention. The text tower follows the image length (its 32 tokens cost less than the
    image tower gains). Evaluation (forward only), fp32 and GPUs keep SDPA. Enter it around the
    backward too: activation checkpointing re-runs the forward there.
    """
    if inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16 and image_tokens <= EAGER_MAX_TOKENS:
        return eager_attention(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Every timm attention layer of `model` on its eager path while inside."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    fused = [layer.fused_attn for layer in layers]
    for layer in layers:
        layer.fused_attn = False
    try:
        yield
    finally:
        for layer, was_fused in zip(layers, fused):
            layer.fused_attn = was_fused
