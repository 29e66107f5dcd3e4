"""`flip-ds train`: validate the recipe, then train under DeepSpeed on whatever launcher started us."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flip_ds.cli import HelpFormatter

if TYPE_CHECKING:
    from flip_ds.config import BatchSplit, Recipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a FLIP model from a recipe",
        description="Train FLIP under DeepSpeed. Launch one process per device with `deepspeed --num_gpus N`, "
                    "`torchrun --nproc_per_node N`, `srun` (one task per GPU), or plainly for one process. "
                    "Overrides are dotted recipe keys, e.g. train.global_batch=65536 phases.0.mask_ratio=0.75 "
                    "resume=auto.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE, applied after the recipe")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe for the world size and print the resolved plan, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size to validate against (default: the launcher's, else 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config import load_recipe
    from flip_ds.config_loader import to_dict
    from flip_ds.engine_config import validate_for_launch

    recipe = load_recipe(args.config, args.overrides)
    world = args.world_size or _launched_world_size()
    splits = validate_for_launch(recipe, world)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(recipe), sort_keys=False).rstrip())
        print(f"# {zero_summary(recipe, world)}")
        print(f"# {launch_summary(recipe, world, splits)}")
        return 0
    from flip_ds.train import train

    return train(recipe)


def _launched_world_size() -> int:
    # imported only here: a recipe error, and a dry run given --world-size, need no torch
    from flip_ds.distributed import detect_dist_env

    return detect_dist_env().world_size


def launch_summary(recipe: Recipe, world: int, splits: list[BatchSplit]) -> str:
    """How a launch on `world` ranks cuts the recipe's batch, in one line (`train --dry-run`, `slurm`)."""
    cut = [f"{s.micro} per device x {s.accum} accumulation" for s in splits]
    per_phase = cut[0] if len(set(cut)) == 1 else "; ".join(f"{p.name} {c}" for p, c in zip(recipe.phases, cut))
    return (f"world size {world}: {per_phase} x {world} ranks = global batch {recipe.train.global_batch}; "
            f"{recipe.total_samples} samples in {len(recipe.phases)} phase(s)")


def zero_summary(recipe: Recipe, world: int) -> str:
    """The ZeRO stage a launch on `world` ranks runs under, and why, in one line (`train --dry-run`)."""
    from flip_ds.engine_config import is_auto_stage, load_engine_json

    engine = load_engine_json(recipe.train.deepspeed)
    if not is_auto_stage(engine):
        return f"ZeRO stage {engine.get('zero_optimization', {}).get('stage', 0)} ({recipe.train.deepspeed})"
    from flip_ds.zero_auto import choice_on_this_machine

    choice = choice_on_this_machine(recipe, world)
    return (f"{choice.message}; a launch on this machine would choose it, every launch chooses again on its "
            "own devices at start")
