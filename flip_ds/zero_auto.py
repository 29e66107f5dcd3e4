"""ZeRO stage "auto" at start-up: the planner's lowest stage that fits this run's devices, decided
alike on every rank and kept by a resume.

An engine JSON with `zero_optimization.stage: "auto"` (ds_configs/zero_auto.json) leaves the stage
to `flip_ds.plan.choose_zero_stage`, the memory model `flip-ds plan` prints, applied to the memory
one rank has here. A resumed run keeps the stage its checkpoint was saved under: ZeRO-1/2 and
ZeRO-3 checkpoints differ in layout, and a requeue onto other hardware must not change the stage
of a run that resumes exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flip_ds import checkpoint
from flip_ds.config import Recipe, load_recipe
from flip_ds.cost import Setting
from flip_ds.engine_config import load_engine_json
from flip_ds.plan import GIB, Cluster, plan, vocab_size_of

log = logging.getLogger(__name__)

PLANNER_VOCAB = 32000  # `flip-ds plan`'s vocabulary when the recipe's tokenizer is not on this machine


@dataclass(frozen=True)
class ZeroChoice:
    stage: int
    reason: str  # in words, for the start-up log and `train --dry-run`
    fits: bool = True  # False: not even ZeRO-3 fits the memory the planner counts

    @property
    def message(self) -> str:
        return f"ZeRO stage {self.stage} ({self.reason})"


def _cgroup_limit_bytes() -> int | None:
    """The tightest memory limit of this process's cgroup and its parents (SLURM's --mem, a
    container's limit), cgroup v2 or v1; None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            directory, name = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):  # v1
            directory, name = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        for level in (directory, *directory.parents):
            try:
                text = (level / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():  # v2 writes 'max' when unlimited
                limits.append(int(text))
    return min(limits, default=None)


def host_memory_bytes() -> int:
    """The host's physical memory, or its cgroup's limit when that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(physical, _cgroup_limit_bytes() or physical)


def device_memory_bytes(device: str, local_ranks: int) -> int:
    """The memory one rank has: all of its GPU's, as torch reports it and `flip-ds plan --gpu-mem`
    takes it (the planner's reserve covers the CUDA context), or on a CPU its share of the host's."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return host_memory_bytes() // max(local_ranks, 1)


def saved_stage(save_dir: Path, tag: str) -> int:
    """The ZeRO stage checkpoint `tag` was saved under: its meta.json's, or, for a checkpoint from
    before flip-ds recorded it, the stage of the engine JSON its recipe named."""
    meta = checkpoint.read_meta(save_dir, tag)
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    saved = load_recipe(str(save_dir / tag / "recipe.yaml"))
    return int(load_engine_json(saved.train.deepspeed).get("zero_optimization", {}).get("stage", 0))


def choose_stage(recipe: Recipe, device: str, precision: str, world: int, local_ranks: int,
                 memory_bytes: int) -> ZeroChoice:
    """The ZeRO stage for `recipe` on `world` ranks (`local_ranks` per node) with `memory_bytes`
    each: the stage of the checkpoint a resume loads, else the planner's lowest stage that fits."""
    resume = checkpoint.find_resume(recipe, Path(recipe.output_dir) / "checkpoints")
    if resume:
        return ZeroChoice(saved_stage(*resume), f"auto: the stage of the checkpoint this run resumes, "
                                                f"{resume[0] / resume[1]}")
    cluster = Cluster(gpus=world, gpu_mem_gib=memory_bytes / GIB, gpus_per_node=local_ranks)
    p = plan(recipe, cluster, Setting(), vocab_size_of(recipe, PLANNER_VOCAB), precision=precision)
    return ZeroChoice(p.zero.stage, f"auto on {device}, {precision}: {p.zero_reason}", p.fits)


def choose_on_all_ranks(recipe: Recipe, device: str, precision: str) -> ZeroChoice:
    """`choose_stage` for this run, in its process group: the rank with the least memory sets the
    budget, so that every rank picks the same stage (DeepSpeed needs that). Logged."""
    from flip_ds.distributed import detect_dist_env, max_over_ranks, rank

    denv = detect_dist_env()
    least = -max_over_ranks([-float(device_memory_bytes(device, denv.local_world_size))])[0]
    choice = choose_stage(recipe, device, precision, denv.world_size, denv.local_world_size, int(least))
    if choice.fits:
        log.info(choice.message)
    elif rank() == 0:  # every rank chose alike: said once
        log.warning(f"{choice.message}: the run may run out of memory; lower train.micro_batch or turn on "
                    "model.activation_checkpointing (flip-ds plan shows what fits)")
    return choice


def choice_on_this_machine(recipe: Recipe, world: int) -> ZeroChoice:
    """What a launch of `world` ranks here would choose (`flip-ds train --dry-run`): one rank per
    GPU, or on a CPU every rank sharing this host."""
    import torch

    from flip_ds.precision import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = min(world, torch.cuda.device_count()) if device == "cuda" else world
    precision = resolve_precision(recipe.train.precision, device).name
    return choose_stage(recipe, device, precision, world, local, device_memory_bytes(device, local))
