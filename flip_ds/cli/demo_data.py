"""`flip-ds demo-data`: write the built-in dataset of captioned shapes (no download)."""

from __future__ import annotations

import argparse

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-data", help="write the built-in dataset of captioned shapes (no download)",
        description="Render captioned scenes of coloured shapes into training shards, a 16-class zero-shot "
                    "folder with class names and templates, a retrieval set, and a SentencePiece tokenizer "
                    "(see docs/data.md). Deterministic from --seed; a complete directory is left as it is.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-samples", type=int, default=6000, help="training samples")
    p.add_argument("--eval-per-class", type=int, default=25, help="zero-shot images per class (16 classes)")
    p.add_argument("--retrieval-images", type=int, default=200, help="retrieval images (3 captions each)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per training shard")
    p.add_argument("--vocab-size", type=int, default=256, help="SentencePiece vocabulary size")
    p.add_argument("--seed", type=int, default=0, help="seed of everything rendered")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.data.synthetic import make_demo_dataset

    data = make_demo_dataset(args.out, train_samples=args.train_samples, eval_per_class=args.eval_per_class,
                             image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                             retrieval_images=args.retrieval_images, vocab_size=args.vocab_size, seed=args.seed)
    print(f"demo data in {data.root}:\n  train shards  {data.train} ({data.train_samples} samples)\n"
          f"  tokenizer     {data.tokenizer}\n  zero-shot     {data.zero_shot} (classnames {data.classnames}, "
          f"templates {data.templates})\n  retrieval     {data.retrieval}")
    return 0
