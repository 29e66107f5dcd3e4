"""Which attention implementation a training step runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from timm.layers.attention import Attention
from torch import nn


def training_attention(model: nn.Module, inputs: torch.Tensor) -> contextlib.AbstractContextManager:
    """The attention path for a training step of `model` on inputs like `inputs`.

    On a CPU in bf16, timm's eager path (q @ k^T, softmax, @ v, all in bf16) trains faster than
    either of torch's SDPA kernels at every length: flash has a slow bf16 backward, and the math
    kernel upcasts q, k and v to fp32, so its matmuls miss the bf16 units and it pays for the
    casts. One B/16 attention layer with its projections, forward + backward, batch 32, one
    thread, torch 2.14, ms, flash / math / eager: 50 tokens (mask 0.75) 216-228 / 143-166 /
    95-102; 99 tokens (mask 0.5) 481-505 / 450-582 / 248-314; 197 tokens (mask 0) 648-702 /
    1046 / 445-541. The scores are rounded to bf16 before the softmax, as in any eager bf16 or
    autocast attention. Evaluation (forward only), fp32 and GPUs keep SDPA. Enter it around the
    backward too: activation checkpointing re-runs the forward there.
    """
    if inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16:
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
