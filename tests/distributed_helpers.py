"""Running test code on several real processes over gloo, and the CLI under real launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` spawned processes in a gloo group; a failure on any
    rank fails the caller. `fn` must be importable (defined at module level)."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn", join=True)


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict[str, str] | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m flip_ds ARGS`, as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "flip_ds", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def spawn_ranks(args: list[str], nproc: int = 2, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> list[subprocess.Popen]:
    """One `python -m flip_ds ARGS` process per rank with the launcher's environment set by hand
    (what the deepspeed launcher does), so each rank's exit status and PID are the test's to see."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "flip_ds", *args], cwd=cwd, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar read back from the event files: {samples seen: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def texts(log_dir: Path, tag: str) -> list[str]:
    """A TensorBoard text summary (`SummaryWriter.add_text`) read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [s.decode() for e in acc.Tensors(f"{tag}/text_summary") for s in e.tensor_proto.string_val]
