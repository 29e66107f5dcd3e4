"""Linear probe: multinomial logistic regression on frozen image features (CLIP's protocol).

The L2 strength is chosen on a held-out split of the training set (stratified, seeded): a sweep
over C = 10^-6 .. 10^6 in decades, then quarter-decades around the best; ties go to the smaller C
(stronger regularisation). The probe is then refit on the whole training set with that C and
scored on the test set. Features are encoded on every rank; the fit runs on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flip_ds.config_loader import UsageError
from flip_ds.evaluation.datasets import ClassificationSet, ImageDataset
from flip_ds.evaluation.features import ImageSource, encode_all, image_encoder

COARSE_EXPONENTS = [float(e) for e in range(-6, 7)]
FINE_OFFSETS = [-0.75, -0.5, -0.25, 0.25, 0.5, 0.75]


@dataclass
class ProbeFit:
    top1: float  # test accuracy of the probe refit on all of train
    c: float
    val_top1: float  # held-out accuracy at that C
    sweep: list[dict] = field(default_factory=list)  # every C tried, in order: {"C", "val_top1"}


def image_features(model: torch.nn.Module, data: ClassificationSet, *, image_size: int, batch_size: int,
                   workers: int, device: torch.device, dtype: torch.dtype, tower_only: bool, desc: str,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, skipped images) of the readable images of `data`."""
    feats, valid = encode_all(ImageSource(ImageDataset(data.images, image_size), workers),
                              image_encoder(model, device, dtype, tower_only=tower_only), batch_size, device,
                              desc, progress)
    labels = np.asarray(data.labels)[valid.numpy()]
    return feats[valid].numpy(), labels, int((~valid).sum())


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
              val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> ProbeFit:
    from sklearn.model_selection import train_test_split

    if len(np.unique(train_y)) < 2:
        raise UsageError("linear probe: the training set needs images of at least 2 classes")
    counts = np.bincount(train_y)
    n_classes = int((counts > 0).sum())
    # Stratified when every class can give one image to each side; the held-out side then needs
    # at least one image per class, so small sets hold out a little more than val_fraction.
    n_val = max(round(val_fraction * len(train_y)), n_classes)
    stratify = counts[counts > 0].min() >= 2 and len(train_y) - n_val >= n_classes
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=n_val if stratify else val_fraction, random_state=seed,
        stratify=train_y if stratify else None)
    tried: dict[float, float] = {}

    def val_score(exponent: float) -> float:
        if exponent not in tried:
            tried[exponent] = float(_fit(fit_x, fit_y, 10.0**exponent, max_iter).score(val_x, val_y))
        return tried[exponent]

    def best(exponents: list[float]) -> float:
        return max(sorted(exponents), key=lambda e: (val_score(e), -e))  # equal accuracy: smaller C

    coarse = best(COARSE_EXPONENTS)
    chosen = best([coarse] + [coarse + d for d in FINE_OFFSETS])
    c = 10.0**chosen
    test_top1 = float(_fit(train_x, train_y, c, max_iter).score(test_x, test_y))
    sweep = [{"C": 10.0**e, "val_top1": acc} for e, acc in tried.items()]
    return ProbeFit(top1=test_top1, c=c, val_top1=tried[chosen], sweep=sweep)

