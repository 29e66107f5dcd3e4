"""`flip-ds slurm`: submit a recipe with slurm/train.sbatch, validated first, optionally as a chain of jobs."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flip_ds.cli import HelpFormatter
from flip_ds.config_loader import UsageError

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm", help="submit a training run to Slurm (validated, requeued on preemption, optionally chained)",
        description="Validate the recipe for nodes x tasks ranks (as `flip-ds train --dry-run` does), then sbatch "
                    "slurm/train.sbatch with one task per GPU. The job saves a checkpoint and requeues itself on "
                    "the --signal before its time limit; --chain K also queues K-1 follow-up jobs "
                    "(--dependency=afterany) for clusters that refuse requeues. Logs go to OUTPUT_DIR/slurm/. "
                    "See docs/slurm.md.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE, passed to every job")
    add_submit_arguments(p, default_name="the recipe's file name")
    p.add_argument("--dry-run", action="store_true", help="validate and print the sbatch command(s); submit nothing")
    p.set_defaults(func=run)


def add_submit_arguments(p: argparse.ArgumentParser, default_name: str) -> None:
    """The job's shape and the scheduler's options, shared with `flip-ds sweep --slurm`."""
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each; 0 for CPU nodes")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task: data loader workers + 1 (flip-ds bench-data --recipe says how many); "
                        "default: the partition's CPUs per node divided by the tasks per node (sinfo)")
    p.add_argument("--time", default=None, help="time limit per job, e.g. 24:00:00 (default: the partition's)")
    p.add_argument("--partition", default=None, help="partition")
    p.add_argument("--account", default=None, help="account to charge")
    p.add_argument("--qos", default=None, help="quality of service")
    p.add_argument("--job-name", default=None, help=f"job name (default: {default_name})")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="seconds before the time limit at which the run checkpoints and requeues")
    p.add_argument("--chain", type=int, default=1, help="jobs to queue one after another (afterany)")
    p.add_argument("--max-restarts", type=int, default=100, help="requeues allowed per job (FLIP_MAX_RESTARTS)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, repeatable, e.g. --sbatch-arg=--exclusive --sbatch-arg=--mem=0")
    p.add_argument("--template", default=str(TEMPLATE), help="the sbatch script")


def world_size_of(args: argparse.Namespace) -> int:
    """The ranks the submission asks for, once its flags are checked."""
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise UsageError("--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0")
    if args.chain < 1 or args.max_restarts < 0 or args.signal_seconds < 1:
        raise UsageError("--chain and --signal-seconds must be >= 1, --max-restarts >= 0")
    if not Path(args.template).is_file():
        raise UsageError(f"--template: '{args.template}' does not exist (run from a flip-ds checkout or pass it)")
    return args.nodes * (args.tasks_per_node or args.gpus_per_node or 1)


def _cpus_per_task(partition: str | None, tasks_per_node: int) -> int | None:
    """The partition's smallest node's CPUs shared by the tasks on a node; None where sinfo cannot
    say (the job then gets Slurm's default, often one CPU per task)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%c", *(["-p", partition] if partition else [])],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(c.rstrip("+")) for c in out.stdout.split() if c.rstrip("+").isdigit()]
    return max(1, min(counts) // tasks_per_node) if out.returncode == 0 and counts else None


def sbatch_command(args: argparse.Namespace, name: str, log_file: Path, dependency: str | None,
                   script_args: list[str], array: str | None = None) -> list[str]:
    """sbatch of the template with `script_args` (a recipe and its overrides, or @LIST for an array)."""
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
           f"--signal=B:USR1@{args.signal_seconds}", f"--output={log_file.absolute()}",
           f"--chdir={os.getcwd()}",
           # the job runs the Python (and so the flip-ds) that submitted it
           f"--export=ALL,FLIP_PYTHON={sys.executable},FLIP_MAX_RESTARTS={args.max_restarts}"]
    cpus = args.cpus_per_task or _cpus_per_task(args.partition, tasks)
    for flag, value in (("gpus-per-node", args.gpus_per_node or None), ("cpus-per-task", cpus),
                        ("time", args.time), ("partition", args.partition), ("account", args.account),
                        ("qos", args.qos), ("dependency", dependency), ("array", array)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    return [*cmd, *args.sbatch_arg, args.template, *script_args]


def submit_chain(args: argparse.Namespace, command: Callable[[str | None], list[str]]) -> list[str] | None:
    """Queue args.chain jobs, each after the previous one ends (afterany); the job ids, or None
    (said on stderr) when sbatch refused one."""
    jobs: list[str] = []
    for _ in range(args.chain):
        result = subprocess.run(command(f"afterany:{jobs[-1]}" if jobs else None), capture_output=True, text=True)
        if result.returncode != 0:
            print(f"flip-ds: error: sbatch refused the job: {result.stderr.strip()}", file=sys.stderr)
            if jobs:
                print(f"flip-ds: jobs already queued: {' '.join(jobs)} (scancel them if unwanted)", file=sys.stderr)
            return None
        jobs.append(result.stdout.strip().split(";")[0])
    return jobs


def run(args: argparse.Namespace) -> int:
    from flip_ds.cli.train import launch_summary
    from flip_ds.config import load_recipe
    from flip_ds.engine_config import validate_for_launch

    world = world_size_of(args)
    recipe = load_recipe(args.config, args.overrides)
    splits = validate_for_launch(recipe, world)  # a recipe that cannot run stops here, before anything is queued
    output_dir = Path(recipe.output_dir)
    print(f"recipe ok: {launch_summary(recipe, world, splits)}")

    def command(dependency: str | None) -> list[str]:
        return sbatch_command(args, args.job_name or Path(args.config).stem, output_dir / "slurm" / "%x-%j.out",
                              dependency, [args.config, *args.overrides])

    if args.dry_run:
        for k in range(args.chain):
            print(shlex.join(command("afterany:$PREVIOUS_JOB" if k else None)))
        return 0
    (output_dir / "slurm").mkdir(parents=True, exist_ok=True)
    jobs = submit_chain(args, command)
    if jobs is None:
        return 1
    print(f"submitted job(s) {' '.join(jobs)}; logs in {output_dir / 'slurm'}, TensorBoard in "
          f"{output_dir / 'tensorboard'}")
    return 0
