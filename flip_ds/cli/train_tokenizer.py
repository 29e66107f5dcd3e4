"""`flip-ds train-tokenizer`: a SentencePiece model from caption text files or straight from shards."""

from __future__ import annotations

import argparse

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer", help="train the SentencePiece tokenizer on captions (text files or shards)",
        description="Train a unigram SentencePiece model with the ids flip-ds expects (pad 0, unk 1, bos 2, eos 3) "
                    "on captions read from text files (one caption a line) or from the .txt members of "
                    "webdataset shards. Writes PREFIX.model.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="model prefix: writes OUT.model")
    p.add_argument("--shards", default=None, help="shard spec to read captions from, e.g. /data/{00000..00099}.tar")
    p.add_argument("--captions", nargs="*", default=[], help="text files of captions, one a line")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size")
    p.add_argument("--max-captions", type=int, default=5_000_000, help="read at most this many captions")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="SentencePiece character coverage")
    p.add_argument("--no-lowercase", action="store_true", help="keep the case of captions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import UsageError
    from flip_ds.data.tokenizer import TrainingCaptions, train_tokenizer

    if not args.shards and not args.captions:
        raise UsageError("train-tokenizer: give --shards SPEC and/or --captions FILE ...")
    captions = TrainingCaptions(args.captions, args.shards, args.max_captions)
    try:
        path = train_tokenizer(captions, args.out, vocab_size=args.vocab_size, lowercase=not args.no_lowercase,
                               character_coverage=args.character_coverage, max_sentences=args.max_captions)
    except UsageError as e:
        raise UsageError(f"train-tokenizer: {e}") from None
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(captions.skipped.items())) or "nothing"
    print(f"wrote {path} from {captions.read} captions; skipped: {skipped}")
    return 0
