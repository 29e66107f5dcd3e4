"""`flip-ds export`: a DeepSpeed checkpoint to one safetensors file, and the vision tower to timm."""

from __future__ import annotations

import argparse
from pathlib import Path

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="consolidate a checkpoint into safetensors (whole model and/or timm vision tower)",
        description="Consolidate a ZeRO-1/2/3 checkpoint (OUTPUT_DIR, OUTPUT_DIR/checkpoints or a tag directory) "
                    "with DeepSpeed's zero_to_fp32, or re-export an exported file. --out writes the whole model "
                    "with its recipe and tokenizer embedded (load it with flip_ds.load(path), no DeepSpeed "
                    "needed); --timm-out writes the vision tower as a timm VisionTransformer state dict and "
                    "prints the timm.create_model call that loads it.",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or exported .safetensors file")
    p.add_argument("--out", type=Path, default=None, help="whole-model .safetensors file to write (default: none)")
    p.add_argument("--timm-out", type=Path, default=None,
                   help="vision-tower .safetensors file for timm (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import check_flag

    check_flag(args.out is not None or args.timm_out is not None, "export: give --out and/or --timm-out")
    from flip_ds.checkpoint import read_checkpoint
    from flip_ds.export import export_model, export_timm, timm_create_call

    ckpt = read_checkpoint(args.checkpoint)
    params = sum(t.numel() for t in ckpt.state_dict.values())
    if args.out is not None:
        export_model(ckpt, args.out)
        print(f"wrote {args.out}: {params / 1e6:.2f}M parameters (fp32) of {ckpt.recipe.model.name}, "
              f"recipe and tokenizer embedded; load with flip_ds.load({str(args.out)!r})")
    if args.timm_out is not None:
        kwargs = export_timm(ckpt, args.timm_out)
        print(f"wrote {args.timm_out}: the vision tower for timm; load it with\n"
              f"import timm, safetensors.torch\n{timm_create_call(kwargs, args.timm_out)}")
    return 0
