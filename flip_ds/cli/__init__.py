"""`flip-ds`: one entry point, a subcommand per job. Each subcommand lives in its own module
with a `register(subparsers)` that adds its parser; heavy imports (torch, deepspeed) happen
only inside the command that needs them, so `--help` and recipe errors are instant."""

from __future__ import annotations

import argparse
import importlib
import sys

from flip_ds.config_loader import UsageError

COMMANDS = [
    "flip_ds.cli.train",
    "flip_ds.cli.model_info",
    "flip_ds.cli.demo", "flip_ds.cli.bench",
    "flip_ds.cli.plan",
    "flip_ds.cli.sweep",
    "flip_ds.cli.slurm",
    "flip_ds.cli.make_shards", "flip_ds.cli.demo_data", "flip_ds.cli.train_tokenizer", "flip_ds.cli.bench_data",
    "flip_ds.cli.eval",
    "flip_ds.cli.export",
    "flip_ds.cli.report",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each optional argument's default, unless its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required or "(default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-ds",
        description="FLIP (masked-image CLIP) pre-training on PyTorch + DeepSpeed.",
        epilog="Run 'flip-ds COMMAND --help' for each command's options.",
    )
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:  # the user's input is wrong (ConfigError: the recipe's): one line, no traceback
        print(f"flip-ds: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
