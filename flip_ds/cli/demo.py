"""`flip-ds demo`: the built-in end-to-end run (what ./run_demo.sh calls)."""

from __future__ import annotations

import argparse

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build the built-in dataset, train, export, evaluate and report (minutes on a CPU)",
        description="The end-to-end demo: makes the built-in dataset and tokenizer if absent, trains the tiny "
                    "recipe with the deepspeed launcher in the machine's layout (single-threaded ranks, one per "
                    "core, on a CPU; one rank per GPU), exports the model, evaluates zero-shot classification "
                    "and retrieval on held-out data, and prints a summary.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml", help="recipe to train")
    p.add_argument("--data", default="data/demo", help="where the built-in dataset lives (made if absent)")
    p.add_argument("--out", default="runs/demo", help="run directory (replaced on every demo run)")
    p.add_argument("--train-samples", type=int, default=6000, help="training samples of the built-in dataset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.demo import run_demo

    return run_demo(args.config, args.data, args.out, args.train_samples)
