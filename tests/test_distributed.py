"""The collectives' one owner (flip_ds/distributed.py): nothing else calls torch.distributed, the
helpers hand results back where the caller holds its tensors, and the process-group timeout ends a
collective that waits for a rank that stopped."""

from __future__ import annotations

import ast
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flip_ds import distributed
from flip_ds.distributed import DistEnv
from tests.distributed_helpers import REPO, free_port, run_on_ranks

OWNER = "flip_ds/distributed.py"
COLLECTIVE_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collective_uses(source: str) -> list[str]:
    """Lines of `source` that import a collective module or call into one through `torch.`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith(COLLECTIVE_MODULES)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith(COLLECTIVE_MODULES) or (module in ("torch", "deepspeed") and any(
                    a.name in ("distributed", "comm") for a in node.names)):
                found.append(f"{node.lineno}: from {module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append(f"{node.lineno}: torch.distributed")
    return found


def test_no_module_but_the_owner_calls_a_collective():
    offenders = {}
    for path in sorted((REPO / "flip_ds").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        if relative != OWNER:
            uses = direct_collective_uses(path.read_text())
            if uses:
                offenders[relative] = uses
    assert offenders == {}, f"collectives belong in {OWNER}: {offenders}"


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.all_reduce(x)",
    "from torch.distributed import all_reduce",
    "from torch import distributed",
    "import torch\ntorch.distributed.barrier()",
    "import deepspeed.comm as dist",
])
def test_the_scan_catches_each_way_of_reaching_a_collective(source):
    assert direct_collective_uses(source)


def _helpers(rank: int, world: int) -> None:
    # the caller's tensor on the CPU; the result comes back there, reduced over the ranks
    values = torch.tensor([float(rank + 1), 10.0 * rank])
    assert torch.equal(distributed.all_reduce(values.clone(), "sum"), torch.tensor([3.0, 10.0]))
    assert torch.equal(distributed.all_reduce(values.clone(), "max"), torch.tensor([2.0, 10.0]))
    assert torch.equal(distributed.all_reduce(values.clone(), "min"), torch.tensor([1.0, 0.0]))
    parts = distributed.all_gather(torch.full((2, 3), float(rank)))
    assert [p.device.type for p in parts] == ["cpu", "cpu"]
    assert torch.equal(torch.stack(parts), torch.stack([torch.zeros(2, 3), torch.ones(2, 3)]))
    assert distributed.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
    assert distributed.max_over_ranks([rank, -rank]) == [1.0, 0.0]
    assert distributed.any_rank(rank == 1, False) == [True, False]
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (rank, 2, True)
    assert distributed.collective_device() == torch.device("cpu")  # gloo


def test_helpers_reduce_and_gather_over_two_ranks():
    run_on_ranks(_helpers, 2)


def test_helpers_are_identities_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(t, "max") is t and distributed.all_gather(t) == [t]
    assert distributed.all_gather_object("x") == ["x"] and distributed.any_rank(True, False) == [True, False]
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    distributed.barrier()  # no group: nothing to wait for


def test_gloo_collectives_take_cpu_tensors():
    assert distributed.device_for_backend("gloo") == torch.device("cpu")


def _stalled_peer(rank: int, port: int, timeout_s: float, result: str) -> None:
    """Rank 1 joins the group, then stops answering; rank 0's next collective must fail by itself."""
    os.environ["OMP_NUM_THREADS"] = "1"
    distributed.init_distributed(DistEnv(rank, rank, 2, 2, "127.0.0.1", port, "torch"), timeout_s=timeout_s)
    if rank == 1:  # silent until rank 0 has its answer (or a minute has passed)
        deadline = time.time() + 60
        while not Path(result).exists() and time.time() < deadline:
            time.sleep(0.2)
        os._exit(0)
    start = time.perf_counter()
    try:
        distributed.all_reduce(torch.ones(1))
        outcome = "returned"
    except RuntimeError as e:  # DistBackendError is one
        outcome = f"raised {type(e).__name__}"
    Path(result).write_text(f"{outcome} after {time.perf_counter() - start:.1f}")
    os._exit(0)  # a group with a silent peer cannot be torn down politely


def test_a_collective_waiting_for_a_stalled_rank_fails_after_the_timeout(tmp_path):
    result = tmp_path / "rank0.txt"
    timeout_s = 4.0
    mp.start_processes(_stalled_peer, args=(free_port(), timeout_s, str(result)), nprocs=2, start_method="spawn",
                       join=True)
    outcome, waited = result.read_text().rsplit(" after ", 1)
    assert outcome.startswith("raised"), outcome
    assert timeout_s - 1 <= float(waited) <= timeout_s + 10  # DeepSpeed's default would have waited 600 s


# -- one source for the launcher's world and for quieting DeepSpeed ----------------------------------
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_NTASKS_PER_NODE")


@pytest.mark.parametrize("env", [
    {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},  # torchrun / deepspeed
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "MASTER_ADDR": "127.0.0.1"},  # srun
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"},  # sbatch's own shell: no step, so no rank
    {},  # no launcher
], ids=["torchrun", "srun", "sbatch-shell", "none"])
def test_train_dry_run_validates_for_the_world_the_trainer_would_join(env, monkeypatch, capsys):
    """`train --dry-run` without --world-size reads the launcher as the trainer does (detect_dist_env)."""
    from flip_ds.cli import main

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    world = distributed.detect_dist_env().world_size
    assert main(["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run",
                 "train.micro_batch=8"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"# world size {world}: 8 per device x {8 // world} ")


def _calls_in(path: str, function: str) -> set[str]:
    """Names of the functions `function` in `path` calls (`f(...)` and `module.f(...)` alike)."""
    tree = ast.parse((REPO / path).read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
            for c in ast.walk(body) if isinstance(c, ast.Call)}


def test_train_and_bench_quiet_deepspeed_through_the_one_filter():
    """Both entry points that build DeepSpeed engines call quiet_deepspeed; no other module filters
    warnings; and the filter drops the deprecation warnings ZeRO causes, nothing else."""
    for path, function in (("flip_ds/train.py", "train"), ("flip_ds/bench/runner.py", "run_bench")):
        assert "quiet_deepspeed" in _calls_in(path, function), f"{path}:{function} does not call quiet_deepspeed"
    sources = {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "flip_ds").rglob("*.py")}
    assert [path for path, text in sources.items() if "filterwarnings" in text] == [OWNER]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.quiet_deepspeed()
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.distributed.all_reduce` is deprecated"]
