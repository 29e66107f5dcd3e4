"""`flip-ds train-tokenizer`: a SentencePiece model from caption text files or straight from shards."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

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


def _shard_captions(spec: str, counts: dict[str, int]) -> Iterator[str]:
    from flip_ds.data.reader import ShardReader, Skip, parse_caption
    from flip_ds.data.shards import expand_spec

    for url in expand_spec(spec):
        reader = ShardReader(url)
        for raw in reader:
            try:
                yield parse_caption(raw)
            except Skip as skip:
                counts[skip.cause] = counts.get(skip.cause, 0) + 1
        if reader.fault:
            counts[reader.fault] = counts.get(reader.fault, 0) + 1


def _file_captions(files: list[str]) -> Iterator[str]:
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as f:
            yield from (line.strip() for line in f)


def run(args: argparse.Namespace) -> int:
    from itertools import chain, islice

    from flip_ds.config_loader import ConfigError
    from flip_ds.data.shards import list_shards
    from flip_ds.data.tokenizer import train_tokenizer

    if not args.shards and not args.captions:
        raise ConfigError("train-tokenizer: give --shards SPEC and/or --captions FILE ...")
    for name in args.captions:
        try:
            open(name, "rb").close()
        except OSError as e:
            raise ConfigError(f"captions file '{name}' cannot be read: {e.strerror}") from None
    counts: dict[str, int] = {}
    sources = [_file_captions(args.captions)]
    if args.shards:
        list_shards(args.shards)  # a spec matching nothing fails now
        sources.append(_shard_captions(args.shards, counts))
    read = [0]

    def captions() -> Iterator[str]:
        for text in islice(chain(*sources), args.max_captions):
            read[0] += 1
            yield text

    try:
        path = train_tokenizer(captions(), args.out, vocab_size=args.vocab_size, lowercase=not args.no_lowercase,
                               character_coverage=args.character_coverage, max_sentences=args.max_captions)
    except ConfigError as e:
        raise ConfigError(f"train-tokenizer: {e}") from None
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"
    print(f"wrote {path} from {read[0]} captions; skipped: {skipped}")
    return 0
