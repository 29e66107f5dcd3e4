"""Zero-shot and retrieval metrics on hand-built cases with known answers, ties included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flip_ds.evaluation import retrieval, zero_shot
from flip_ds.evaluation.metrics import classification_ranks, recall_at, retrieval_ranks, target_ranks


def stable_sort_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: position of each target in a stable descending sort (ties keep column order)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return (order == targets[:, None]).int().argmax(dim=1)


def test_target_ranks_break_ties_by_lower_index():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],
                           [0.2, 0.9, 0.9, 0.9],
                           [0.3, 0.3, 0.7, 0.3]])
    assert target_ranks(scores, torch.tensor([0, 0, 0])).tolist() == [0, 3, 1]
    assert target_ranks(scores, torch.tensor([2, 3, 3])).tolist() == [2, 2, 3]


def test_target_ranks_equal_a_stable_sort_on_many_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (200, 30), generator=g).float()  # 4 distinct values: ties everywhere
    targets = torch.randint(0, 30, (200,), generator=g)
    assert torch.equal(target_ranks(scores, targets), stable_sort_ranks(scores, targets))


def test_zero_shot_identical_embeddings_are_all_correct():
    classes = [f"c{i}" for i in range(8)]
    emb = torch.eye(8)
    metrics, per_class = zero_shot.score(emb, torch.arange(8), emb, classes, classes)
    assert metrics == {"top1": 1.0, "top5": 1.0, "mean_per_class": 1.0}
    assert [p["top1"] for p in per_class] == [1.0] * 8


def test_zero_shot_permutation_gives_exact_accuracy():
    # image i looks exactly like class perm[i]; labels say class i: right only where perm[i] == i
    perm = torch.tensor([0, 2, 1, 3, 5, 4, 6, 7])
    class_emb = torch.eye(8)
    metrics, per_class = zero_shot.score(class_emb[perm], torch.arange(8), class_emb, list("abcdefgh"),
                                         list("abcdefgh"))
    assert metrics["top1"] == 4 / 8
    # the true class scores 0, tied with the six other wrong classes, behind perm[i] (score 1): among
    # the ties, lower indices come first, so the true class's rank is 1 + #{other wrong classes < label}
    assert [p["top1"] for p in per_class] == [1, 0, 0, 1, 0, 0, 1, 1]
    ranks = classification_ranks(class_emb[perm], class_emb, torch.arange(8))
    assert ranks.tolist() == [0, 2, 2, 0, 5, 5, 0, 0]
    assert metrics["top5"] == 6 / 8


def test_zero_shot_all_tied_scores_predict_the_lowest_class():
    labels = torch.tensor([0, 0, 1, 2, 3, 6, 6, 7])
    metrics, per_class = zero_shot.score(torch.zeros(8, 4), labels, F.normalize(torch.ones(8, 4), dim=1),
                                         list("abcdefgh"), list("abcdefgh"))
    assert metrics["top1"] == 2 / 8  # only the class-0 images
    assert metrics["top5"] == 5 / 8  # labels 0..4 are in the first five
    assert per_class[0]["top1"] == 1.0 and per_class[6]["top1"] == 0.0
    assert per_class[4]["images"] == 0 and per_class[4]["top1"] != per_class[4]["top1"]  # nan: no images
    assert metrics["mean_per_class"] == pytest.approx(1 / 6)  # mean over the 6 classes that have images


def test_top5_is_left_out_with_five_classes_or_fewer():
    metrics, _ = zero_shot.score(torch.eye(3), torch.arange(3), torch.eye(3), list("abc"), list("abc"))
    assert set(metrics) == {"top1", "mean_per_class"}


def test_retrieval_identical_embeddings_recall_everything():
    emb = torch.eye(6)
    assert retrieval.score(emb, emb, torch.arange(6)) == {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i")
                                                           for k in (1, 5, 10)}


def test_retrieval_permutation_and_multi_caption_hits():
    # 4 images (one-hot), 8 captions, two per image. Caption 2j+1 describes image j exactly; caption
    # 2j is the text of image (j+1) % 4, so it points at the wrong image.
    images = torch.eye(4)
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    texts = torch.stack([images[(j + 1) % 4] if c % 2 == 0 else images[j] for c, j in enumerate(caption_image)])
    i2t, t2i = retrieval_ranks(images, texts, caption_image)
    # image j: captions scoring 1 are 2j+1 (its own) and 2((j-1)%4) (the wrong one); lower index first
    assert i2t.tolist() == [0, 1, 1, 1]
    # caption 2j: image (j+1)%4 scores 1, then the tied zeros in index order, so its own image j
    # ranks 1 + #{images < j other than (j+1)%4}
    assert t2i.tolist() == [1, 0, 2, 0, 3, 0, 3, 0]
    m = retrieval.score(images, texts, caption_image)
    assert (m["i2t_r1"], m["t2i_r1"], m["t2i_r5"]) == (1 / 4, 4 / 8, 1.0)


def test_retrieval_in_chunks_equals_one_matrix_and_a_stable_sort():
    g = torch.Generator().manual_seed(1)
    n_images, per_image = 37, [1, 2, 3, 5, 7]
    caption_image = torch.cat([torch.full((per_image[i % 5],), i) for i in range(n_images)])
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]  # captions in any order
    images = torch.randint(-2, 3, (n_images, 6), generator=g).float()  # small integers: many exact ties
    texts = torch.randint(-2, 3, (len(caption_image), 6), generator=g).float()
    whole = retrieval_ranks(images, texts, caption_image, chunk=10_000)
    chunked = retrieval_ranks(images, texts, caption_image, chunk=3)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    # reference: each caption's place in a stable sort of its image's row; an image keeps its best
    caption_rank = stable_sort_ranks((images @ texts.T)[caption_image], torch.arange(len(caption_image)))
    best = torch.full((n_images,), len(caption_image)).scatter_reduce(0, caption_image, caption_rank, reduce="amin")
    assert torch.equal(whole[0], best)
    assert torch.equal(whole[1], stable_sort_ranks(texts @ images.T, caption_image))


def test_recall_at():
    assert recall_at(torch.tensor([0, 1, 4, 9, 10]), 1) == 0.2
    assert recall_at(torch.tensor([0, 1, 4, 9, 10]), 10) == 0.8
