"""`flip-ds bench-data`: samples/s of the training data pipeline alone."""

from __future__ import annotations

import argparse
import json

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-data", help="samples/s of the training data pipeline (decode, augment, tokenise), per worker and total",
        description="Measure the data pipeline without a model: first one reader decoding in this process (the "
                    "throughput of one worker on one core), then the full loader with --workers processes.",
        formatter_class=HelpFormatter)
    p.add_argument("--shards", required=True, help="shard spec, e.g. /data/{00000..00099}.tar")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time of the full loader (one reader: half)")
    p.add_argument("--image-size", type=int, default=224, help="crop size")
    p.add_argument("--context-length", type=int, default=32, help="text tokens")
    p.add_argument("--recipe", default=None,
                   help="also say how many CPU cores per GPU keep this recipe's GPUs fed (with --gpus)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs the recipe runs on (the planner's samples/s per GPU)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU, for the planner")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import UsageError, check
    from flip_ds.data.bench import bench_data, feeding

    check((args.recipe is None) == (args.gpus is None), "--recipe and --gpus go together", UsageError)
    r = bench_data(args.shards, args.tokenizer, workers=args.workers, batch_size=args.batch_size,
                   seconds=args.seconds, image_size=args.image_size, context_length=args.context_length)
    if args.recipe:
        r["feeding"] = feeding(args.recipe, args.gpus, args.gpu_mem, r["single_worker_samples_per_cpu_s"])
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"one reader, in-process:  {r['single_worker_samples_per_s']:8.1f} samples/s "
          f"({r['single_worker_samples_per_cpu_s']:.1f} per CPU-second)")
    print(f"loader, {r['workers']} worker(s):     {r['samples_per_s']:8.1f} samples/s total over {r['seconds']} s")
    for worker, rate in r["per_worker_samples_per_s"].items():
        print(f"  worker {worker}:              {rate:8.1f} samples/s")
    if r["skipped"]:
        print(f"skipped: {r['skipped']}")
    if "feeding" in r:
        f = r["feeding"]
        print(f"{f['recipe']} on {f['gpus']} GPUs: up to {f['samples_per_s_per_gpu']:.0f} samples/s per GPU "
              f"({f['phase']} phase, the planner's fast end): {f['loader_cores_per_gpu']:.1f} loader cores per GPU "
              f"at {r['single_worker_samples_per_cpu_s']:.1f} samples per CPU-second, plus one for the training "
              f"process: --cpus-per-task {f['cpus_per_task']}")
    return 0
