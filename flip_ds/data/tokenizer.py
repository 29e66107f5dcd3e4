"""SentencePiece tokenisation to a fixed context length, and training a model from captions (files, shards)."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain, islice

import numpy as np
import sentencepiece as spm

from flip_ds.config_loader import UsageError
from flip_ds.data.reader import ShardReader, Skip, parse_caption
from flip_ds.data.shards import list_shards

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # fixed at training time, read by the text tower
SPECIAL_PIECES = 4  # pad, unk, bos, eos
# SentencePiece's own coverage check; and its words when the vocabulary cannot hold every character
# kept, e.g. "Vocabulary size is smaller than required_chars. 10 vs 31.": 31 = characters + specials
MIN_CHARACTER_COVERAGE = 0.98
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


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


class TrainingCaptions:
    """Captions to train a tokenizer on: text files (one caption a line), then the captions of a shard
    spec read as the training stream reads them, at most `limit` in all.

    The sources are checked when it is made (an unreadable file, a spec matching no file: UsageError).
    While it is read, `read` counts the captions handed out and `skipped` the bad samples and shards
    of the spec by cause (faults.py), so a partly broken dataset still trains a tokenizer and says so.
    """

    def __init__(self, files: list[str], shards: str | None, limit: int) -> None:
        for name in files:
            try:
                open(name, "rb").close()
            except OSError as e:
                raise UsageError(f"captions file '{name}' cannot be read: {e.strerror}") from None
        self.files = files
        self.shards = list_shards(shards) if shards else []
        self.limit = limit
        self.read = 0
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[str]:
        for text in islice(chain(self._file_captions(), self._shard_captions()), self.limit):
            self.read += 1
            yield text

    def _file_captions(self) -> Iterator[str]:
        for name in self.files:
            with open(name, encoding="utf-8", errors="replace") as f:
                yield from (line.strip() for line in f)

    def _shard_captions(self) -> Iterator[str]:
        for url in self.shards:
            reader = ShardReader(url)
            for raw in reader:
                try:
                    yield parse_caption(raw)
                except Skip as skip:
                    self.skipped[skip.cause] += 1
            if reader.fault:
                self.skipped[reader.fault] += 1


def check_training_settings(vocab_size: int, character_coverage: float) -> None:
    """What SentencePiece would refuse with a bare assertion, as a UsageError naming the setting."""
    if vocab_size <= SPECIAL_PIECES:
        raise UsageError(f"vocab size {vocab_size} leaves no room for text: it must exceed the "
                          f"{SPECIAL_PIECES} special pieces (pad, unk, bos, eos) plus the captions' characters")
    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1.0:
        raise UsageError(f"character coverage {character_coverage} is outside SentencePiece's range "
                          f"[{MIN_CHARACTER_COVERAGE}, 1]")


def _training_error(error: RuntimeError, vocab_size: int, character_coverage: float,
                    sentences: int) -> UsageError | None:
    """SentencePiece's refusal of the input as one line that says what to change; None for an
    error that is not one of its checks (a fault of the caption source, say), which stays as it is."""
    if not str(error).lstrip().upper().startswith("INTERNAL:"):  # how SentencePiece words a failed check
        return None
    if sentences == 0:
        return UsageError("no captions to train on: none was read, or every one was empty")
    too_small = _TOO_SMALL.search(str(error))
    if too_small:
        needed = int(too_small.group(2))
        return UsageError(f"vocab size {vocab_size} is too small for these captions: their "
                           f"{needed - SPECIAL_PIECES} distinct characters (at character coverage "
                           f"{character_coverage:g}) and the {SPECIAL_PIECES} special pieces need {needed} pieces; "
                           f"use a vocab size of at least {needed} (thousands for real captions) or a lower "
                           "character coverage")
    return UsageError(f"SentencePiece cannot train on these captions: {' '.join(str(error).split())}")


def train_tokenizer(captions: Iterable[str], model_prefix: str, vocab_size: int = 32000,
                    lowercase: bool = True, character_coverage: float = 0.9995,
                    max_sentences: int = 5_000_000) -> str:
    """Train a unigram SentencePiece model on `captions`; returns the path of the .model file.

    Settings or captions SentencePiece cannot train with (a vocabulary smaller than the captions'
    characters, no captions) raise UsageError with a one-line reason.
    """
    check_training_settings(vocab_size, character_coverage)
    given = [0]

    def sentences() -> Iterator[str]:
        for text in captions:
            text = " ".join(text.split())
            if text:
                given[0] += 1
                yield text

    model = io.BytesIO()
    try:
        _train(sentences(), model, vocab_size, lowercase, character_coverage, max_sentences)
    except RuntimeError as e:  # SentencePiece reports bad input as RuntimeError('INTERNAL: ...')
        error = _training_error(e, vocab_size, character_coverage, given[0])
        if error is None:
            raise
        raise error from None
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _train(sentences: Iterator[str], model: io.BytesIO, vocab_size: int, lowercase: bool,
           character_coverage: float, max_sentences: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=character_coverage, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # case folding lives in the model's normaliser, so encoding lowercases the same way
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc", hard_vocab_limit=False,
        minloglevel=2,
    )
