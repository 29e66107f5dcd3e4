"""`flip-ds train`: validate the recipe, then train under DeepSpeed on whatever launcher started us."""

from __future__ import annotations

import argparse

from flip_ds.cli import HelpFormatter


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
                   help="world size to validate against (default: from WORLD_SIZE / SLURM_NTASKS, else 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config import load_recipe, world_size_from_env
    from flip_ds.config_loader import to_dict
    from flip_ds.engine_config import validate_for_launch

    recipe = load_recipe(args.config, args.overrides)
    world = args.world_size or world_size_from_env()
    splits = validate_for_launch(recipe, world)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(recipe), sort_keys=False).rstrip())
        cut = [f"{s.micro} per device x {s.accum} accumulation" for s in splits]
        per_phase = cut[0] if len(set(cut)) == 1 else "; ".join(f"{p.name} {c}" for p, c in zip(recipe.phases, cut))
        print(f"# world size {world}: {per_phase} x {world} ranks "
              f"= global batch {recipe.train.global_batch}; {recipe.total_samples} samples in "
              f"{len(recipe.phases)} phase(s)")
        return 0
    from flip_ds.train import train

    return train(recipe)
