"""Contrastive (InfoNCE) loss over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flip_ds import distributed


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows.

    Written out because torch's autograd gathers keep being renamed and deprecated between
    releases; all_gather and all_reduce are stable on NCCL and gloo alike. The embeddings are
    small, so all-reducing their gradient costs nothing next to the towers.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return torch.cat(distributed.all_gather(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = distributed.all_reduce(grad.contiguous())
        start = distributed.rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`, concatenated in rank order; gradients flow back to their owners."""
    if not distributed.is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against every rank's columns.

    The scalable form (OpenCLIP's local loss + gather with grad): each rank scores its n local
    rows against all N gathered columns, an (n, N) matrix rather than (N, N), and its positives
    sit at columns offset + i. Gradients flow through the gather, so summing the ranks' losses
    (which DeepSpeed's gradient averaging does, scaled by 1/world) gives exactly the gradient of
    the full-batch loss. The result is this rank's share, averaged over its rows. Logits are in fp32.
    """
    all_image_emb = gather_with_grad(image_emb)
    all_text_emb = gather_with_grad(text_emb)
    offset = image_emb.shape[0] * distributed.rank()
    scale = logit_scale.float()
    logits_per_image = scale * image_emb.float() @ all_text_emb.float().t()
    logits_per_text = scale * text_emb.float() @ all_image_emb.float().t()
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
