"""`flip-ds plan`: per-GPU memory, fit, micro batch, FLOPs and wall-clock of a recipe on N GPUs."""

from __future__ import annotations

import argparse
import json

from flip_ds import cost
from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="memory, fit and cost of a recipe on N GPUs, before allocating any",
        description="Estimate per-GPU memory (model states under the recipe's ZeRO stage and offload, activations "
                    "with and without checkpointing at the recipe's micro batch and masked token count, contrastive "
                    "logits), whether it fits, the largest micro batch that does, the accumulation for the global "
                    "batch, FLOPs per sample, and a wall-clock and GPU-hours range: compute at an MFU range from "
                    "published CLIP runs, communication over stated bandwidths, evaluations, checkpoint writes, "
                    "restarts and failures. See docs/planner.md.",
        formatter_class=HelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides KEY=VALUE, right after the recipe, e.g. train.micro_batch=64")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host memory of offloaded states)")
    p.add_argument("--tflops", type=float, default=cost.H100_BF16_TFLOPS,
                   help="peak dense bf16 TFLOP/s per GPU (H100 / H200 SXM: 989, A100: 312)")
    p.add_argument("--mfu", type=float, nargs=2, metavar=("LOW", "HIGH"), default=[cost.MFU_LOW, cost.MFU_HIGH],
                   help="model FLOPs utilisation range (default: OpenCLIP's ViT-H/14 run on 824 A100s and NVIDIA "
                        "NeMo's ViT-g/14 on H100s, as measured)")
    p.add_argument("--intra-node-gbps", type=float, default=cost.INTRA_NODE_GBPS,
                   help="GB/s each GPU sends in a collective within a node (NVLink)")
    p.add_argument("--inter-node-gbps", type=float, default=cost.INTER_NODE_GBPS,
                   help="GB/s each GPU sends in a collective across nodes (its network share)")
    p.add_argument("--checkpoint-write-gbps", type=float, default=10.0,
                   help="the job's write bandwidth to the checkpoint file system, GB/s")
    p.add_argument("--job-hours", type=float, default=24.0, help="the partition's time limit per job")
    p.add_argument("--restart-s", type=float, default=600.0,
                   help="seconds a restart costs (requeue wait, start-up, checkpoint load)")
    p.add_argument("--failures-per-gpu-day", type=float, default=cost.FAILURES_PER_GPU_DAY,
                   help="interruption rate (default: Llama 3's, 419 in 54 days on 16,384 H100s)")
    p.add_argument("--reserve", type=float, default=4.0,
                   help="GiB per GPU held back for the CUDA context, NCCL buffers and fragmentation")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="text vocabulary, used when the recipe's tokenizer file is not on this machine")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config import load_recipe
    from flip_ds.plan import Cluster, format_plan, plan, vocab_size_of

    recipe = load_recipe(args.recipe, args.overrides)
    cluster = Cluster(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                      reserve_gib=args.reserve)
    setting = cost.Setting(peak_tflops=args.tflops, mfu=tuple(args.mfu), intra_node_gbps=args.intra_node_gbps,
                           inter_node_gbps=args.inter_node_gbps, checkpoint_write_gbps=args.checkpoint_write_gbps,
                           job_hours=args.job_hours, restart_s=args.restart_s,
                           failures_per_gpu_day=args.failures_per_gpu_day)
    result = plan(recipe, cluster, setting, vocab_size_of(recipe, args.vocab_size), recipe_name=args.recipe)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0
