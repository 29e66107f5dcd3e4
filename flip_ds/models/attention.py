"""Which scaled-dot-product-attention kernel a training step runs."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def training_attention(inputs: torch.Tensor) -> contextlib.AbstractContextManager:
    """The SDPA kernels for a training step whose inputs are like `inputs`.

    On a CPU in bf16, torch's flash-attention kernel has a fast forward but a backward several times
    slower than the math path (matmul, softmax, matmul) at ViT lengths. Forward + backward of one
    B/16 layer, batch 8, one thread (torch 2.14): 99 tokens (mask 0.5) 80 ms flash vs 37 ms math,
    50 tokens (mask 0.75) 46 vs 19 ms, 197 tokens 141 vs 133 ms; a 32-token text layer with its
    padding mask 15 vs 5 ms. So bf16 training on a CPU takes the math path; evaluation (forward
    only), fp32 and GPUs keep torch's choice. Enter it around the backward too: activation
    checkpointing re-runs the forward there, and the kernel the forward picked decides the backward.
    """
    if inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
