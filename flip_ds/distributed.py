"""Rank, world and rendezvous from whichever launcher started us: torchrun, the deepspeed launcher,
SLURM's srun (one task per device), or none (a single process), read here and nowhere else; joining
the process group, for training and for evaluation; and every collective flip-ds calls itself.

The collectives live here, and only here, because the backend decides where their tensors must
be: NCCL serves CUDA tensors only, gloo CPU ones. Each helper moves its input to the process
group's device and hands the result back on the caller's device, so a caller may count on the
CPU and still run on a GPU cluster. (DeepSpeed's own collectives are its business.)
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from flip_ds.host_memory import keep_freed_memory

# How long a collective waits for a missing rank before every rank fails (recipe: train.comm_timeout_s).
DEFAULT_COMM_TIMEOUT_S = 600.0


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


def quiet_deepspeed(info_logs: bool = True) -> None:
    """Silence the FutureWarnings DeepSpeed raises on every step (ZeRO still calls collectives that
    torch 2.13+ deprecates) and, with `info_logs=False`, its INFO lines, one set per engine, which
    would bury a benchmark's table."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    if not info_logs:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def cpu_threads_per_rank(local_world_size: int) -> int:
    """Compute threads of each of a node's `local_world_size` CPU ranks: OMP_NUM_THREADS when set,
    else the node's cores shared out (the deepspeed launcher leaves it unset, and every rank would
    use every core)."""
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // local_world_size)


def init_distributed(denv: DistEnv, timeout_s: float = DEFAULT_COMM_TIMEOUT_S) -> str:
    """Join the process group through DeepSpeed; returns the device name ('cuda' or 'cpu').

    A collective that waits `timeout_s` for a rank that stopped fails on every rank that waits,
    so a hung or dead peer ends the job (and a requeue can start it again) instead of holding
    the allocation.
    """
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
            torch.set_num_threads(cpu_threads_per_rank(denv.local_world_size))
        keep_freed_memory()  # no page faults of each step's large buffers anew (flip_ds.host_memory)
    else:
        accelerator.set_device(denv.local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return device


def init_for_inference(denv: DistEnv) -> torch.device:
    """This rank's device for forward-only work (evaluation). Several ranks join the launcher's
    process group, to gather their features, each on its own GPU; one process joins none, so it
    needs no DeepSpeed, and takes the GPU if there is one."""
    if denv.world_size == 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = init_distributed(denv)
    return torch.device(kind, denv.local_rank) if kind == "cuda" else torch.device("cpu")


def shutdown() -> None:
    """Every rank meets, then leaves: without the barrier gloo's worker threads can abort the
    interpreter at exit (`terminate called without an active exception`)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- collectives --------------------------------------------------------------------------------
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank(group: Any = None) -> int:
    """This process's rank in `group` (default: the whole world); 0 without a process group."""
    return dist.get_rank(group=group) if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_for_backend(backend: str) -> torch.device:
    """The device a backend's collectives take their tensors on: gloo the CPU, NCCL (and the other
    accelerator backends) this rank's current device."""
    if backend == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def collective_device() -> torch.device:
    return device_for_backend(str(dist.get_backend()))


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """The reduction over ranks of `tensor`, on `tensor`'s device. In place when that device is the
    collective's; the input is left as it was otherwise. Use the return value."""
    if not is_distributed():
        return tensor
    work = tensor.to(collective_device())
    dist.all_reduce(work, op=_OPS[op])
    return work.to(tensor.device)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, on `tensor`'s device."""
    if not is_distributed():
        return [tensor]
    work = tensor.to(collective_device()).contiguous()
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [p.to(tensor.device) for p in parts]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (torch stages it on the current device)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum of `values` over the ranks."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), "max").tolist()


def any_rank(*flags: bool) -> list[bool]:
    """Each flag raised on any rank, raised on all."""
    return [v > 0 for v in max_over_ranks([float(f) for f in flags])]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
