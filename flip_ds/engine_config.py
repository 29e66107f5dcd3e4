"""The DeepSpeed JSON: the engine file the recipe names, plus the fields derived from the recipe.

Torch-free, so the CLI checks it with the recipe before any process starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flip_ds.config import BatchSplit, Recipe
from flip_ds.config_loader import ConfigError, check

# Fields the engine derives from the recipe and the world size. A DeepSpeed JSON that sets them
# would be a second source of truth for the same number, so it is refused.
RECIPE_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "bf16", "fp16", "optimizer", "scheduler", "gradient_clipping")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# zero_optimization.stage: "auto" leaves the stage to the planner's memory model at start-up
# (flip_ds.zero_auto), as Hugging Face's DeepSpeed integration fills its "auto" values
ZERO_AUTO = "auto"


def resolve_deepspeed_json(path: str) -> Path:
    """A DeepSpeed JSON named absolutely, relative to the working directory, or to the project."""
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.deepspeed: '{path}' does not exist (looked in {os.getcwd()} and {PROJECT_ROOT})")


def load_engine_json(path: str) -> dict[str, Any]:
    resolved = resolve_deepspeed_json(path)
    try:
        config = json.loads(resolved.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: '{resolved}' is not valid JSON: {e}") from None
    for key in RECIPE_OWNED_KEYS:
        check(key not in config, f"train.deepspeed: '{resolved}' sets '{key}', which the recipe owns "
                                 "(train.micro_batch / train.global_batch / train.precision / optim.*): remove it")
    zero = config.get("zero_optimization", {})
    check(isinstance(zero, dict) and zero.get("stage", 0) in (0, 1, 2, 3, ZERO_AUTO),
          f"train.deepspeed: '{resolved}' needs zero_optimization.stage in 1..3 or \"{ZERO_AUTO}\"")
    # Without ZeRO, DeepSpeed's bf16 optimizer keeps no fp32 master that flip-ds can reach (the logit
    # scale trains in fp32 through it: flip_ds.engine.refresh_fp32_logit_scale); in fp32 nothing skips
    # an update with non-finite gradients; and export, evaluation of a checkpoint and resharding read
    # ZeRO checkpoints. Refused before launch rather than found out at the first export.
    unset = "" if "stage" in zero else " (it sets no zero_optimization.stage)"
    check(zero.get("stage", 0) != 0,
          f"train.deepspeed: '{resolved}' is ZeRO stage 0{unset}, which flip-ds does not train under (bf16's fp32 "
          "logit scale, the skip of non-finite gradients and checkpoint export need ZeRO); use stage 1, 2, 3 "
          f"or \"{ZERO_AUTO}\" (on one rank ZeRO-1 shards nothing)")
    offloaded = [k for k in ("offload_optimizer", "offload_param") if k in zero]
    check(not (is_auto_stage(config) and offloaded),
          f"train.deepspeed: '{resolved}' has stage \"{ZERO_AUTO}\" with {offloaded}; \"{ZERO_AUTO}\" chooses among "
          "stages 1-3 without offload: name the stage to offload")
    stray = [k for k in config if k.startswith("stage3_") or k in ("offload_optimizer", "offload_param")]
    check(not stray, f"train.deepspeed: '{resolved}' has {stray} at the top level; they belong in zero_optimization")
    return config


def is_auto_stage(config: dict[str, Any]) -> bool:
    """Whether an engine JSON leaves the ZeRO stage to flip-ds."""
    return config.get("zero_optimization", {}).get("stage") == ZERO_AUTO


def deepspeed_config(recipe: Recipe, split: BatchSplit, device: str, precision: str) -> dict[str, Any]:
    """The engine JSON plus the fields derived from the recipe; `precision` is the recipe's,
    resolved for the hardware ('bf16' or 'fp32', see flip_ds.precision). A stage of "auto" is
    decided here, on every rank alike (flip_ds.zero_auto).

    DeepSpeed's `gradient_accumulation_steps` is our feature-cache micro-batch count: each
    micro batch is re-forwarded and back-propagated once per step, and the engine steps after the
    last one.
    """
    config = load_engine_json(recipe.train.deepspeed)
    if is_auto_stage(config):
        from flip_ds.zero_auto import choose_on_all_ranks

        config["zero_optimization"]["stage"] = choose_on_all_ranks(recipe, device, precision).stage
    # A finite loss can still give a non-finite gradient: ZeRO-1/2 skip that update through the
    # gradient norm in fp32 and through the overflow scan in bf16, so switching the norm off
    # (docs/benchmarks.md, "Per-step overhead") is safe only in bf16.
    check(precision != "fp32" or config.get("zero_optimization", {}).get("compute_grad_norm", True),
          f"train.deepspeed: '{recipe.train.deepspeed}' sets zero_optimization.compute_grad_norm false, which in "
          "fp32 (this run's precision) also switches off DeepSpeed's skip of an update with non-finite gradients; "
          "remove it, or train in bf16")
    config["train_micro_batch_size_per_gpu"] = split.micro
    config["gradient_accumulation_steps"] = split.accum
    config["train_batch_size"] = recipe.train.global_batch
    # DeepSpeed's bf16 overflow check stays on although it costs a pass over the gradients: under
    # ZeRO-1/2 it is also what skips an update whose gradients are non-finite while the loss is finite
    config["bf16"] = {"enabled": precision == "bf16"}
    # Always written: DeepSpeed >= 0.19 clips at 1.0 when the key is absent, and 0 is FLIP's "no clipping"
    config["gradient_clipping"] = recipe.optim.grad_clip
    config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": 0.0, "betas": list(recipe.optim.betas), "eps": recipe.optim.eps,
                   "weight_decay": recipe.optim.weight_decay,
                   # FusedAdam is a CUDA kernel; on a CPU it would JIT-build for a minute and gain nothing.
                   # torch's own AdamW there, fused: one pass over each tensor, ~6x the default loop.
                   **({"torch_adam": True, "fused": True} if device == "cpu" else {})},
    }
    return config


def validate_for_launch(recipe: Recipe, world_size: int) -> list[BatchSplit]:
    """Everything checkable before a process group exists; returns each phase's batch split."""
    splits = recipe.validate_world(world_size)
    load_engine_json(recipe.train.deepspeed)
    return splits
