"""Random in-memory batches: the benchmark measures the model and engine, not the data pipeline."""

from __future__ import annotations

import torch

from flip_ds.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

FIRST_WORD_ID = 4  # ids below are PAD, UNK, BOS, EOS


def random_batch(batch: int, image_size: int, context_length: int, vocab_size: int, *, seed: int,
                 device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and captions laid out as the tokenizer writes them
    (`BOS words EOS PAD...`, lengths varying per caption), generated on the host from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(FIRST_WORD_ID, vocab_size, (batch, context_length), generator=generator)
    lengths = torch.randint(3, context_length + 1, (batch,), generator=generator)  # BOS + >= 1 word + EOS
    tokens[:, 0] = BOS_ID
    tokens[torch.arange(context_length) >= lengths[:, None]] = PAD_ID
    tokens[torch.arange(batch), lengths - 1] = EOS_ID
    return images.to(device, dtype), tokens.to(device)
