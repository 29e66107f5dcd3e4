"""`flip-ds sweep`: a scaling study's grid of runs, trained here one after another or as a Slurm job array."""

from __future__ import annotations

import argparse
from pathlib import Path

from flip_ds.cli import HelpFormatter
from flip_ds.cli.slurm import add_submit_arguments, sbatch_command, submit_chain, world_size_of
from flip_ds.config_loader import check_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="a grid of runs over model x data x schedule (FLIP's scaling study), resumable",
        description="Cross the axes of GRID.yaml (dotted recipe keys of a base recipe, e.g. model.name, data.train, "
                    "phases.0.samples) or keep its named cases, write one ordinary run directory per cell "
                    "(OUTPUT_DIR/cells/NAME with its full recipe) and train the cells: here one after another, or "
                    "with --slurm as one job array (each task requeued and resumed like `flip-ds slurm`). Running it "
                    "again skips finished cells and resumes unfinished ones. `flip-ds report OUTPUT_DIR` then builds "
                    "the table and plots. See docs/scaling.md.",
        formatter_class=HelpFormatter)
    p.add_argument("grid", metavar="GRID.yaml", help="the grid file (see configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE applied to every cell, after the grid's")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes per cell when run here (default: the GPUs, else 1); with --slurm the "
                        "world size is --nodes x tasks per node")
    p.add_argument("--dry-run", action="store_true",
                   help="check every cell's recipe, print the cells, their state and the planner's cost; train nothing")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="--dry-run: GiB per GPU the planner assumes")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished cells as one Slurm job array")
    add_submit_arguments(p, default_name="the grid's file name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.sweep import load_grid, prepare

    grid = load_grid(args.grid)
    if args.slurm:
        world = world_size_of(args)
    else:
        check_flag(args.nproc is None or args.nproc >= 1, f"--nproc: {args.nproc} must be >= 1")
        world = args.nproc or _local_devices()
    cells = prepare(grid, world, args.overrides, write=not args.dry_run)
    print(f"sweep {grid.output_dir}: {len(cells)} cell(s) of {grid.base} on {world} rank(s) each; "
          f"baseline '{grid.baseline}'")
    if args.dry_run:
        print(_cost_table(cells, world, args.gpu_mem))
        return 0
    if args.slurm:
        return _submit(args, grid.output_dir, [i for i, c in enumerate(cells) if c.status() != "done"], cells)
    from flip_ds.sweep_run import run_locally

    status = run_locally(cells, world)
    if status == 0:
        print(f"sweep done; the table and plots: flip-ds report {grid.output_dir}")
    return status


def _local_devices() -> int:
    import torch

    return torch.cuda.device_count() or 1


def _cost_table(cells, world: int, gpu_mem: float) -> str:
    """Each cell's state, samples, FLOPs and the planner's wall clock on `world` GPUs of `gpu_mem` GiB."""
    from flip_ds import cost
    from flip_ds.models.flops import flops_per_sample
    from flip_ds.plan import Cluster, plan, vocab_size_of

    cluster = Cluster(gpus=world, gpu_mem_gib=gpu_mem)
    rows = [("cell", "case", "labels", "state", "samples", "PFLOP", f"hours on {world} GPU(s)", "GPU-hours", "fits")]
    totals = [0.0, 0.0]
    for c in cells:
        p = plan(c.recipe, cluster, cost.Setting(), vocab_size_of(c.recipe, 32000))
        flops = sum(ph.samples * flops_per_sample(c.recipe.model, ph.mask_ratio).train for ph in p.phases)
        slow, fast = p.hours
        totals[0] += slow * world
        totals[1] += fast * world
        rows.append((c.cell.name, c.cell.case or "-", " ".join(c.cell.labels.values()), c.status(),
                     f"{c.total_samples:,}", f"{flops / 1e15:.3g}", f"{fast:.3g}-{slow:.3g}",
                     f"{fast * world:.3g}-{slow * world:.3g}", "yes" if p.fits else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"total: {totals[1]:.3g}-{totals[0]:.3g} GPU-hours (planner: {gpu_mem:g} GiB GPUs at "
                 f"{cost.H100_BF16_TFLOPS:g} TFLOP/s peak; `flip-ds plan` for one cell's detail)")
    return "\n".join(lines)


def _submit(args: argparse.Namespace, root: Path, todo: list[int], cells) -> int:
    if not todo:
        print("every cell is done; nothing to submit")
        return 0
    array = ",".join(str(i) for i in todo)
    name = args.job_name or Path(args.grid).stem
    print(f"submitting {len(todo)} unfinished cell(s) as a job array: "
          + ", ".join(cells[i].cell.name for i in todo))

    def command(dependency: str | None) -> list[str]:
        return sbatch_command(args, name, root / "slurm" / "%x-%A_%a.out", dependency,
                              [f"@{(root / 'cells.list').absolute()}"], array=array)

    (root / "slurm").mkdir(parents=True, exist_ok=True)
    jobs = submit_chain(args, command)
    if jobs is None:
        return 1
    print(f"submitted job array(s) {' '.join(jobs)}; logs in {root / 'slurm'} (task i = line i + 1 of "
          f"{root / 'cells.list'}); when they end: flip-ds report {root}")
    return 0
