"""Contrastive (InfoNCE) loss over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`, concatenated in rank order; gradients flow back to their owners."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


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
