"""`flip-ds bench`: masking speedup, largest batch per mask, ZeRO stages, MFU, and OpenCLIP side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flip_ds.cli import HelpFormatter
from flip_ds.models.config import REGISTRY


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark training steps: masking speedup, ZeRO stages, MFU, OpenCLIP side by side",
        description="Train a few steps of a model size under the real DeepSpeed engine on synthetic in-memory "
                    "batches, on as many ranks as the launcher started (plain, `torchrun --nproc_per_node N`, "
                    "`deepspeed --num_gpus N`). Every (ZeRO stage, precision, attention, mask) setup, the matmul "
                    "peak and OpenCLIP's trainer (--peer) run interleaved, A B C A B C ..., and are reported as "
                    "medians.",
        formatter_class=HelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="B/16", help=f"registry size: {', '.join(REGISTRY)}")
    which.add_argument("--config", default=None, metavar="RECIPE",
                       help="benchmark a recipe's model instead (its model section: a registry name or a shape of "
                            "its own); --context-length and --activation-checkpointing still apply (default: --model)")
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75], help="image mask ratios")
    p.add_argument("--text-masks", type=float, nargs="*", default=[0.0, 0.5],
                   help="text mask ratios at which the text tower alone is timed (forward + backward, tokens "
                        "dropped as phases[].text_mask_ratio drops them); none: not timed")
    p.add_argument("--precision", nargs="+", choices=["auto", "bf16", "fp32"], default=["auto"],
                   help="precisions; auto: bf16 on GPUs and on CPUs with native bf16, fp32 on other CPUs")
    p.add_argument("--zero", type=int, nargs="+", default=[1], help="ZeRO stages (ds_configs/zero{1,2,3}.json)")
    p.add_argument("--attention", nargs="+", choices=["auto", "sdpa", "eager"], default=["auto"],
                   help="attention paths of flip-ds's steps (model.attention); auto: what training takes per mask")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="timed blocks per setup, interleaved; medians reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per setup before the first round")
    p.add_argument("--peer", action="store_true",
                   help="also train OpenCLIP's twin of the model with its own trainer (needs open-clip-torch)")
    p.add_argument("--peer-precision", nargs="+", choices=["auto", "bf16", "fp32"], default=None,
                   help="OpenCLIP's precisions, bf16 being its autocast (amp_bf16); None: the same as --precision")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest per-rank batch at each mask under a memory budget")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="per-rank budget for --max-batch (default: what mask 0 needs at --batch)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute every block in backward")
    p.add_argument("--vocab-size", type=int, default=49408, help="text vocabulary (OpenCLIP's by default)")
    p.add_argument("--context-length", type=int, default=32, help="text tokens per caption")
    p.add_argument("--json", type=Path, default=None, help="also write the full result as JSON to this file")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long check of the machinery: the tiny model, batch 4, one round of one step")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.bench.runner import BenchSpec, run_bench
    from flip_ds.bench.table import format_max_batch, format_peer, format_rows, format_text_tower
    from flip_ds.models.config import model_section

    shape = model_section(args.config) if args.config else None
    spec = BenchSpec(model=shape.get("name", "B/16") if shape else args.model, shape=shape, batch=args.batch,
                     masks=args.masks, text_masks=args.text_masks, precisions=args.precision,
                     stages=args.zero, attention=args.attention, steps=args.steps, rounds=args.rounds,
                     warmup=args.warmup, peer=args.peer, peer_precisions=args.peer_precision,
                     max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                     vocab_size=args.vocab_size, context_length=args.context_length,
                     activation_checkpointing=args.activation_checkpointing)
    if args.smoke:
        spec.model, spec.shape, spec.batch, spec.steps, spec.rounds, spec.warmup, spec.vocab_size = \
            "tiny", None, 4, 1, 1, 1, 1000
    result = run_bench(spec)
    if result is None:  # not rank 0
        return 0
    m = result.machine
    print(f"# {spec.model} on {m['ranks']} rank(s) of {m['device']} ({m['accelerator']}, {m['threads_per_rank']} "
          f"thread(s) per rank), batch {spec.batch} per rank; medians of {spec.rounds} interleaved rounds of "
          f"{spec.steps} step(s); matmul peak per rank: "
          + ", ".join(f"{p} {t:.3f} TFLOP/s" for p, t in result.peak_tflops_per_rank.items())
          + f"; host load average {m['load_average_before']:.1f} before, {m['load_average_after']:.1f} after")
    print(format_rows(result.rows))
    if result.peer:
        print("\n# flip-ds (all ranks) vs OpenCLIP (one process, every thread), best setup of each per mask")
        print(format_peer(result.peer))
    if result.max_batch:
        print(f"\n# largest batch per rank under the same memory ({result.max_batch[0]['measure']})")
        print(format_max_batch(result.max_batch))
    if result.text_tower:
        print(f"\n# the text tower alone, forward + backward of {spec.batch} captions per rank, tokens dropped")
        print(format_text_tower(result.text_tower))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0

