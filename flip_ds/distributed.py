"""Rank, world and rendezvous from whichever launcher started us: torchrun, the deepspeed launcher,
SLURM's srun (one task per device), or none (a single process)."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # 'torch' (torchrun / deepspeed), 'slurm' or 'none'


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_dist_env() -> DistEnv:
    """What the launcher told us. torchrun and deepspeed export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*;
    srun exports SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and leaves the rendezvous to us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world))),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_STEP_TASKS_PER_NODE", "1")).split("(")[0])
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       local_world, env.get("MASTER_ADDR") or _first_slurm_host(),
                       int(env.get("MASTER_PORT", 20000 + job % 10000)), "slurm")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", _free_port(), "none")


def init_distributed(denv: DistEnv) -> str:
    """Join the process group through DeepSpeed; returns the device name ('cuda' or 'cpu')."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(RANK=str(denv.rank), LOCAL_RANK=str(denv.local_rank), WORLD_SIZE=str(denv.world_size),
                      MASTER_ADDR=denv.master_addr, MASTER_PORT=str(denv.master_port))
    accelerator = get_accelerator()
    device = accelerator.device_name()
    if device == "cpu":
        # DeepSpeed JIT-compiles a shared-memory op (about a minute of g++) at every process-group
        # init on CPU; it only serves inference all-reduce, which training never calls.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:
            # the deepspeed launcher leaves OMP threads unset: every rank would use every core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // denv.local_world_size))
    else:
        accelerator.set_device(denv.local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    return device


def shutdown() -> None:
    """Every rank meets, then leaves: without the barrier gloo's worker threads can abort the
    interpreter at exit (`terminate called without an active exception`)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
