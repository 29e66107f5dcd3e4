"""The text tower alone, forward + backward, at a text mask ratio: what dropping text tokens saves."""

from __future__ import annotations

import torch

from flip_ds.bench.cases import timed
from flip_ds.data.tokenizer import EOS_ID, PAD_ID
from flip_ds.models.config import ModelConfig
from flip_ds.models.text import TextTransformer
from flip_ds.precision import dtype_of


def text_tower(cfg: ModelConfig, vocab_size: int, precision: str, device: str) -> TextTransformer:
    """`cfg`'s text tower on its own, as FLIP builds it, in `precision` on `device`."""
    s = cfg.sizes
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=vocab_size, context_length=cfg.context_length, width=s.text_width,
                            depth=s.text_depth, heads=s.text_heads, mlp_ratio=s.text_mlp_ratio,
                            attention=cfg.text_attention, text_mask=cfg.text_mask, pad_id=PAD_ID, eos_id=EOS_ID,
                            activation_checkpointing=cfg.activation_checkpointing)
    return tower.to(device, dtype_of(precision))


class TextTowerCase:
    """Forward + backward of a text tower over fixed captions at text mask `ratio`, on every rank.

    Timed apart from the engine: the step times the towers together, and the text tower is a
    small share of it, so its own saving would drown in the image tower's noise.
    """

    def __init__(self, tower: TextTransformer, tokens: torch.Tensor, precision: str, ratio: float,
                 device: str) -> None:
        self.tower, self.tokens, self.precision, self.ratio, self.device = tower, tokens, precision, ratio, device
        self.name = f"text tower {precision} text mask {ratio:g}"
        self.generator = torch.Generator(device=device).manual_seed(0)

    def run_block(self, steps: int) -> float:
        def work() -> None:
            for _ in range(steps):
                self.tower.zero_grad(set_to_none=True)
                self.tower(self.tokens, self.ratio, self.generator).float().sum().backward()

        return timed(self.device, work, steps)
