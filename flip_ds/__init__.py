"""flip-ds: FLIP (masked-image CLIP) pre-training on PyTorch + DeepSpeed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from flip_ds.config import Recipe
    from flip_ds.data.tokenizer import Tokenizer
    from flip_ds.models.flip import FLIP


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[FLIP, Tokenizer, Recipe]:
    """(FLIP model in eval mode, Tokenizer, Recipe) from an exported safetensors file or a DeepSpeed
    checkpoint directory; see flip_ds.checkpoint. Imported lazily so that `import flip_ds` (and the
    CLI's --help) does not pay for torch."""
    from flip_ds.checkpoint import load as load_model

    return load_model(path, device)
