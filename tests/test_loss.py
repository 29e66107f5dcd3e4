"""The contrastive loss over the global batch equals the one-process full-batch loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flip_ds.loss import contrastive_loss
from tests.distributed_helpers import run_on_ranks

N, D_IN, D = 8, 12, 6


def make_problem():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    w_img, w_txt = torch.randn(D, D_IN, generator=g), torch.randn(D, D_IN, generator=g)
    scale = torch.tensor([7.0])
    return images, texts, w_img, w_txt, scale


def loss_and_grads(loss_fn, images, texts, w_img, w_txt, scale):
    w_img, w_txt, scale = (t.clone().requires_grad_(True) for t in (w_img, w_txt, scale))
    loss = loss_fn(images, texts, w_img, w_txt, scale)
    loss.backward()
    return loss.detach(), w_img.grad, w_txt.grad, scale.grad


def flip_loss(images, texts, w_img, w_txt, scale):
    return contrastive_loss(F.normalize(images @ w_img.t(), dim=-1), F.normalize(texts @ w_txt.t(), dim=-1), scale)


def reference_loss(images, texts, w_img, w_txt, scale):
    """CLIP's loss written out on the full batch, independently of flip_ds.loss."""
    i, t = F.normalize(images @ w_img.t(), dim=-1), F.normalize(texts @ w_txt.t(), dim=-1)
    logits = scale * i @ t.t()
    labels = torch.arange(len(i))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def test_single_process_matches_reference():
    problem = make_problem()
    for ours, ref in zip(loss_and_grads(flip_loss, *problem), loss_and_grads(reference_loss, *problem)):
        assert torch.allclose(ours, ref, atol=1e-6)


def _two_rank_check(rank: int, world: int) -> None:
    images, texts, w_img, w_txt, scale = make_problem()
    full = loss_and_grads(reference_loss, images, texts, w_img, w_txt, scale)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    local = list(loss_and_grads(flip_loss, images[rows], texts[rows], w_img, w_txt, scale))
    for t in local:  # what DeepSpeed's data-parallel averaging does
        dist.all_reduce(t)
        t /= world
    for ours, ref in zip(local, full):
        assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_two_ranks_equal_full_batch_loss_and_gradients():
    run_on_ranks(_two_rank_check, 2)
