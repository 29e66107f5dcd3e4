"""`flip-ds model-info`: parameters and FLOPs per sample of every registry size."""

from __future__ import annotations

import argparse
import json

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts and FLOPs per sample of the model sizes",
                       description="Print parameters (image / text / total) and forward GFLOPs per image-text pair "
                                   "at each mask ratio for every registry size (or one, with --model).",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="one registry name (tiny, B/16, L/16, L/14, H/14) (default: all)")
    p.add_argument("--vocab-size", type=int, default=32000, help="text vocabulary size")
    p.add_argument("--context-length", type=int, default=32, help="text tokens (FLIP's 32)")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75], help="mask ratios")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.models.config import REGISTRY
    from flip_ds.models.info import model_info

    names = [args.model] if args.model else list(REGISTRY)
    rows = [model_info(name, args.vocab_size, args.context_length, args.masks) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'model':<6} {'image M':>9} {'text M':>8} {'total M':>9}" + "".join(
        f" {'GFLOPs@' + format(m, 'g'):>12}" for m in args.masks)
    print(head)
    for r in rows:
        print(f"{r['model']:<6} {r['params_image'] / 1e6:9.2f} {r['params_text'] / 1e6:8.2f} "
              f"{r['params_total'] / 1e6:9.2f}" + "".join(f" {f['forward_gflops']:12.2f}" for f in r["flops"]))
    print("GFLOPs: forward, one image-text pair; training is about 3x.")
    return 0
