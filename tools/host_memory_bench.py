"""What keeping freed memory (flip_ds.host_memory) saves a CPU training step: flip-ds's step
(`flip-ds bench`'s engine and synthetic batch, one process with every core) with glibc's default
malloc and with flip-ds's setting. mallopt cannot give a process glibc's defaults back (its dynamic
mmap threshold ends at the first call), so each setting runs in processes of its own, alternating
(A B A B ...); median seconds and page faults per step (docs/benchmarks.md, "Host memory").

    python tools/host_memory_bench.py --model B/16 --batch 16 --masks 0.75 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = ("glibc", "keep")


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """In this process: {mask: [median seconds, median faults]} per step, under args.malloc."""
    import deepspeed

    from flip_ds import distributed
    from flip_ds.bench.flip_case import FlipEngine
    from flip_ds.config_loader import from_dict
    from flip_ds.host_memory import keep_freed_memory
    from flip_ds.models.config import ModelConfig

    if args.malloc == "keep":
        keep_freed_memory()
    # the process group without flip_ds.distributed.init_distributed, which keeps freed memory itself
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(distributed.detect_dist_env().master_port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = from_dict(ModelConfig, {"name": args.model, "context_length": 32}, "model")
    engine = FlipEngine(cfg, args.vocab_size, stage=1, precision="bf16", batch=args.batch, rank=0, world_size=1,
                        device="cpu")
    results = {}
    for mask in args.masks:
        engine.use_attention_for(mask)
        engine.step(mask)
        seconds, faults = [], []
        for _ in range(args.steps):
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            engine.step(mask)
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        results[str(mask)] = [statistics.median(seconds), statistics.median(faults)]
    engine.destroy()
    distributed.shutdown()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--masks", type=float, nargs="+", default=[0.75, 0.0])
    p.add_argument("--vocab-size", type=int, default=49408, help="flip-ds bench's default")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mask and process")
    p.add_argument("--rounds", type=int, default=3, help="processes per setting")
    p.add_argument("--malloc", choices=SETTINGS, help="measure in this process only (what each round runs)")
    args = p.parse_args()
    if args.malloc:
        print(json.dumps(measure(args)))
        return
    runs: dict[str, list[dict[str, list[float]]]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--malloc", setting],
                                  stdout=subprocess.PIPE, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for mask in map(str, args.masks):
        base = statistics.median(r[mask][0] for r in runs["glibc"])
        for setting in SETTINGS:
            seconds = statistics.median(r[mask][0] for r in runs[setting])
            faults = statistics.median(r[mask][1] for r in runs[setting])
            print(f"{args.model} batch {args.batch} mask {mask} malloc {setting:5s} {seconds:7.3f} s/step "
                  f"{faults:8.0f} faults/step  {base / seconds:.2f}x")


if __name__ == "__main__":
    main()
