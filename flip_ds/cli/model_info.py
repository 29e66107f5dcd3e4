"""`flip-ds model-info`: parameters and FLOPs per sample of every registry size, or of any shape."""

from __future__ import annotations

import argparse
import json

from flip_ds.cli import HelpFormatter
from flip_ds.models.config import REGISTRY


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts and FLOPs per sample of the model sizes",
                       description="Print parameters (image / text / total) and forward GFLOPs per image-text pair "
                                   "at each mask ratio for every registry size, one of them (--model), or the "
                                   "model of a recipe (--config), whatever its shape.",
                       formatter_class=HelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help=f"one registry name ({', '.join(REGISTRY)}) (default: all)")
    which.add_argument("--config", default=None, metavar="RECIPE",
                       help="a recipe (or a YAML file with only its model section) whose model to count: a registry "
                            "name or a shape of its own (model.vision, model.text, model.embed_dim) (default: --model)")
    p.add_argument("--vocab-size", type=int, default=32000, help="text vocabulary size")
    p.add_argument("--context-length", type=int, default=32, help="text tokens (FLIP's 32)")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75], help="mask ratios")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import check_flag, from_dict
    from flip_ds.models.config import ModelConfig, model_section
    from flip_ds.models.info import model_info

    if args.config:
        models = [from_dict(ModelConfig, model_section(args.config), "model")]
    else:
        check_flag(args.model is None or args.model in REGISTRY,
                   f"--model: '{args.model}' is not a registry size; choose one of {', '.join(REGISTRY)}, "
                   f"or give a recipe with a shape of its own (--config)")
        models = [ModelConfig(name=name) for name in ([args.model] if args.model else REGISTRY)]
    rows = [model_info(cfg, args.vocab_size, args.context_length, args.masks) for cfg in models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    label = max(6, *(len(r["model"]) for r in rows))
    head = f"{'model':<{label}} {'image M':>9} {'text M':>8} {'total M':>9}" + "".join(
        f" {'GFLOPs@' + format(m, 'g'):>12}" for m in args.masks)
    print(head)
    for r in rows:
        print(f"{r['model']:<{label}} {r['params_image'] / 1e6:9.2f} {r['params_text'] / 1e6:8.2f} "
              f"{r['params_total'] / 1e6:9.2f}" + "".join(f" {f['forward_gflops']:12.2f}" for f in r["flops"]))
    print("GFLOPs: forward, one image-text pair; training is about 3x.")
    return 0
