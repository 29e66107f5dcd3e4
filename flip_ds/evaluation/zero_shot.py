"""Zero-shot classification: a class's text embedding is the normalised mean over its prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flip_ds.config_loader import UsageError
from flip_ds.data.tokenizer import Tokenizer
from flip_ds.evaluation.datasets import ClassificationSet, ImageDataset
from flip_ds.evaluation.features import ImageSource, TokenSource, encode_all, image_encoder, text_encoder
from flip_ds.evaluation.metrics import classification_ranks, recall_at

TOP_K = (1, 5)


@dataclass
class ZeroShotResult:
    metrics: dict[str, float]  # top1, top5 (when there are more than 5 classes), mean_per_class
    per_class: list[dict]  # {"class": folder, "name": prompt name, "images": n, "top1": accuracy}
    images: int  # evaluated (readable) images
    skipped_images: int


def class_embeddings(model: torch.nn.Module, tokenizer: Tokenizer, classnames: list[str], templates: list[str],
                     batch_size: int, device: torch.device, dtype: torch.dtype, progress: bool = True) -> torch.Tensor:
    """(C, D) normalised means of each class's normalised prompt embeddings (prompt ensembling)."""
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    tokens = torch.from_numpy(tokenizer(prompts))
    emb, _ = encode_all(TokenSource(tokens), text_encoder(model, device, dtype), batch_size, device,
                        "zero-shot prompts", progress)
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def score(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
          classes: list[str], classnames: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Top-k accuracy (ties: the lower class index wins) and per-class top-1 of the given images."""
    ranks = classification_ranks(image_emb, class_emb, labels)
    metrics = {f"top{k}": recall_at(ranks, k) for k in TOP_K if k == 1 or k < len(classes)}
    per_class = []
    for c, (folder, name) in enumerate(zip(classes, classnames)):
        hits = ranks[labels == c] == 0
        per_class.append({"class": folder, "name": name, "images": int(hits.numel()),
                          "top1": hits.double().mean().item() if hits.numel() else float("nan")})
    present = [p["top1"] for p in per_class if p["images"]]
    metrics["mean_per_class"] = sum(present) / len(present)
    return metrics, per_class


def evaluate_zero_shot(model: torch.nn.Module, tokenizer: Tokenizer, data: ClassificationSet, classnames: list[str],
                       templates: list[str], *, image_size: int, batch_size: int, workers: int,
                       device: torch.device, dtype: torch.dtype, mask_ratio: float = 0.0, seed: int = 0,
                       progress: bool = True) -> ZeroShotResult:
    class_emb = class_embeddings(model, tokenizer, classnames, templates, batch_size, device, dtype, progress)
    image_emb, valid = encode_all(ImageSource(ImageDataset(data.images, image_size), workers),
                                  image_encoder(model, device, dtype, mask_ratio, seed), batch_size, device,
                                  "zero-shot images", progress)
    if not valid.any():
        raise UsageError(f"none of the {len(valid)} images of the zero-shot set could be read")
    labels = torch.tensor(data.labels)[valid]
    metrics, per_class = score(image_emb[valid], labels, class_emb, data.classes, classnames)
    return ZeroShotResult(metrics, per_class, int(valid.sum()), int((~valid).sum()))
