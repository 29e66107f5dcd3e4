"""Top-k accuracy and retrieval recall, exact and deterministic.

Ranking rule: candidates are ordered by descending score; equal scores are ordered by candidate
index, the lower index first (a stable sort). A target's rank is therefore
    #{candidates scoring higher} + #{candidates scoring equal with a lower index},
counted directly (no sort, no `topk`, whose order among ties is unspecified), and the target is
in the top k when its rank is below k. Scores are computed in row chunks so that a 25k x 5k
caption-image matrix never has to exist at once.
"""

from __future__ import annotations

import torch

CHUNK = 256  # query rows scored at once


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of column targets[i] in row i of `scores` (Q, C) under the ranking rule."""
    target_scores = scores.gather(1, targets[:, None])
    higher = (scores > target_scores).sum(1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    tied_before = ((scores == target_scores) & (columns[None] < targets[:, None])).sum(1)
    return higher + tied_before


def classification_ranks(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Rank of the true class for each image, classes scored by dot product."""
    return torch.cat([target_ranks(image_emb[i:i + chunk] @ class_emb.T, labels[i:i + chunk])
                      for i in range(0, len(labels), chunk)])


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                    chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-to-text ranks (I,), text-to-image ranks (T,)).

    Image to text: the rank of the best-ranked of the image's own captions (a hit if any of them
    is retrieved: the Flickr30k / COCO Karpathy convention). Text to image: the rank of the
    caption's image. An image with no caption gets rank T (never a hit).
    """
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    t2i = torch.cat([target_ranks(text_emb[i:i + chunk] @ image_emb.T, caption_image[i:i + chunk])
                     for i in range(0, n_texts, chunk)])
    # Each image's captions as a padded (I, M) index table; -1 pads.
    counts = torch.bincount(caption_image, minlength=n_images)
    width = max(int(counts.max()), 1)
    order = torch.argsort(caption_image, stable=True)
    slot = torch.arange(n_texts) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    own = torch.full((n_images, width), -1, dtype=torch.long)
    own[caption_image[order], slot] = order
    i2t = []
    for i in range(0, n_images, chunk):
        scores = image_emb[i:i + chunk] @ text_emb.T  # (c, T)
        mine = own[i:i + chunk]
        ranks = torch.stack([_ranks_or_never(scores, mine[:, m]) for m in range(width)], dim=1)
        i2t.append(ranks.min(dim=1).values)
    return torch.cat(i2t), t2i


def _ranks_or_never(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ranks = target_ranks(scores, targets.clamp(min=0))
    return torch.where(targets >= 0, ranks, torch.full_like(ranks, scores.shape[1]))


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """Share of queries whose target ranks in the top k."""
    return (ranks < k).double().mean().item()
