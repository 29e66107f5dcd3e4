"""Which scaled-dot-product-attention kernel a training step runs."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# On a CPU in bf16, up to this many image tokens the math kernel trains faster than flash.
MATH_KERNEL_MAX_TOKENS = 128


def training_attention(inputs: torch.Tensor, image_tokens: int) -> contextlib.AbstractContextManager:
    """The SDPA kernels for a training step whose images are like `inputs` and whose image tower
    sees `image_tokens` tokens (kept patches + CLS).

    On a CPU in bf16, torch's flash-attention kernel has a fast forward but a slow backward, so the
    math path (matmul, softmax, matmul) wins on short sequences and flash on long ones, where the
    quadratic part dominates. Forward + backward of one B/16 layer's attention, one thread, torch
    2.14, ms, math vs flash: batch 32 at 50 tokens (mask 0.75) 47 vs 109, 99 tokens (mask 0.5) 125
    vs 222, 197 tokens (mask 0) 528 vs 348; batch 8 at 197 tokens 110 vs 71. A step's kernel choice
    follows its image length (the 32-token text tower, 3x faster on math, costs less than the
    vision tower gains). Evaluation (forward only), fp32 and GPUs keep torch's choice. Enter it
    around the backward too: activation checkpointing re-runs the forward there, and the kernel the
    forward picked decides the backward.
    """
    if (inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16
            and image_tokens <= MATH_KERNEL_MAX_TOKENS):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
