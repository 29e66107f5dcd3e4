"""SentencePiece tokenisation to a fixed context length, and training a model from captions."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # fixed at training time, read by the text tower


class Tokenizer:
    """`[BOS] pieces [EOS] [PAD]...` in `context_length` ids; EOS stays last when a caption is cut."""

    def __init__(self, model: str | bytes, context_length: int) -> None:
        """`model`: a SentencePiece .model file, or its bytes (as embedded in an exported model)."""
        source = model if isinstance(model, str) else "<bytes>"
        try:
            self.sp = (spm.SentencePieceProcessor(model_file=model) if isinstance(model, str)
                       else spm.SentencePieceProcessor(model_proto=model))
        except (OSError, RuntimeError) as e:
            raise FileNotFoundError(f"cannot load SentencePiece model '{source}': {e}") from None
        if (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"SentencePiece model '{source}' must use pad={PAD_ID} bos={BOS_ID} eos={EOS_ID}; "
                             "train it with `flip-ds train-tokenizer`")
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """int64 ids, shape (context_length,) for one text or (n, context_length) for a list."""
        single = isinstance(texts, str)
        batch = [texts] if single else texts
        out = np.full((len(batch), self.context_length), PAD_ID, dtype=np.int64)
        for row, ids in zip(out, self.sp.encode(batch)):
            ids = [BOS_ID, *ids[: self.context_length - 2], EOS_ID]
            row[: len(ids)] = ids
        return out[0] if single else out


def train_tokenizer(captions: Iterable[str], model_prefix: str, vocab_size: int = 32000,
                    lowercase: bool = True, character_coverage: float = 0.9995,
                    max_sentences: int = 5_000_000) -> str:
    """Train a unigram SentencePiece model on `captions`; returns the path of the .model file."""

    def sentences() -> Iterator[str]:
        for text in captions:
            text = " ".join(text.split())
            if text:
                yield text

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=character_coverage, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # case folding lives in the model's normaliser, so encoding lowercases the same way
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc", hard_vocab_limit=False,
        minloglevel=2,
    )
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
