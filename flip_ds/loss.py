"""Contrastive (InfoNCE) loss over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows.

    Written out because torch's autograd gathers keep being renamed and deprecated between
    releases; all_gather and all_reduce are stable on NCCL and gloo alike. The embeddings are
    small, so all-reducing their gradient costs nothing next to the towers.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`, concatenated in rank order; gradients flow back to their owners."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     all_image_emb: torch.Tensor | None = None, all_text_emb: torch.Tensor | None = None,
                     offset: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against every rank's columns.

    The scalable form (OpenCLIP's local loss + gather with grad): each rank scores its n local
    rows against all N gathered columns, an (n, N) matrix rather than (N, N), and its positives
    sit at columns offset + i. Gradients flow through the gather, so summing the ranks' losses
    (which DeepSpeed's gradient averaging does, scaled by 1/world) gives exactly the gradient of
    the full-batch loss. The result is this rank's share, averaged over its rows.

    `all_*_emb` and `offset` may be given by the caller (feature-cache accumulation passes the
    cached columns of all micro batches); by default they are gathered here. Logits are in fp32.
    """
    if all_image_emb is None:
        all_image_emb = gather_with_grad(image_emb)
        all_text_emb = gather_with_grad(text_emb)
        offset = image_emb.shape[0] * (dist.get_rank() if dist.is_initialized() else 0)
    assert all_text_emb is not None and offset is not None
    scale = logit_scale.float()
    logits_per_image = scale * image_emb.float() @ all_text_emb.float().t()
    logits_per_text = scale * text_emb.float() @ all_image_emb.float().t()
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
