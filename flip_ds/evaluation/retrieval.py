"""Zero-shot image-text retrieval: recall at 1, 5 and 10 in both directions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flip_ds.config_loader import UsageError
from flip_ds.data.tokenizer import Tokenizer
from flip_ds.evaluation.datasets import ImageDataset, RetrievalSet
from flip_ds.evaluation.features import ImageSource, TokenSource, encode_all, image_encoder, text_encoder
from flip_ds.evaluation.metrics import recall_at, retrieval_ranks

RECALL_K = (1, 5, 10)


@dataclass
class RetrievalResult:
    metrics: dict[str, float]  # i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10
    images: int  # readable images evaluated
    captions: int  # captions of those images
    skipped_images: int  # unreadable; they and their captions are left out of both directions


def score(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    i2t, t2i = retrieval_ranks(image_emb, text_emb, caption_image)
    metrics = {f"i2t_r{k}": recall_at(i2t, k) for k in RECALL_K}
    metrics.update({f"t2i_r{k}": recall_at(t2i, k) for k in RECALL_K})
    return metrics


def evaluate_retrieval(model: torch.nn.Module, tokenizer: Tokenizer, data: RetrievalSet, *, image_size: int,
                       batch_size: int, workers: int, device: torch.device, dtype: torch.dtype,
                       mask_ratio: float = 0.0, seed: int = 0, progress: bool = True) -> RetrievalResult:
    tokens = torch.from_numpy(tokenizer(data.captions))
    text_emb, _ = encode_all(TokenSource(tokens), text_encoder(model, device, dtype), batch_size, device,
                             "retrieval captions", progress)
    image_emb, valid = encode_all(ImageSource(ImageDataset(data.images, image_size), workers),
                                  image_encoder(model, device, dtype, mask_ratio, seed), batch_size, device,
                                  "retrieval images", progress)
    if not valid.any():
        raise UsageError(f"none of the {len(valid)} images of the retrieval set could be read")
    # Drop unreadable images and their captions; renumber the remaining images 0..I'-1.
    new_index = torch.cumsum(valid.long(), 0) - 1
    owner = torch.tensor(data.caption_image)
    kept = valid[owner]
    metrics = score(image_emb[valid], text_emb[kept], new_index[owner[kept]])
    return RetrievalResult(metrics, int(valid.sum()), int(kept.sum()), int((~valid).sum()))
