"""The DeepSpeed engine: initialised with the optimizer's parameter groups; lr and state control."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flip_ds.config import BatchSplit, Recipe
from flip_ds.engine_config import deepspeed_config
from flip_ds.models.flip import no_weight_decay


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: nn.Module, recipe: Recipe, split: BatchSplit, device: str, precision: str,
               load_universal: bool = False):  # -> DeepSpeedEngine
    """`split`: the first step's micro batch and accumulation (set_batch_split changes them).
    `precision`: 'bf16' or 'fp32', the recipe's choice resolved for the hardware (flip_ds.precision).
    `load_universal`: the checkpoint to be loaded is a universal one (saved on another world size)."""
    import deepspeed

    config = deepspeed_config(recipe, split, device, precision)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, recipe.optim.weight_decay),
                                      config=config)
    return engine


def set_batch_split(engine, split: BatchSplit, global_batch: int) -> None:
    """A phase's own micro batch and accumulation (DeepSpeed counts micro steps to the boundary)."""
    engine.set_train_micro_batch_size(split.micro)
    engine.set_train_batch_size(global_batch)
    engine.optimizer.gradient_accumulation_steps = split.accum


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def reset_optimizer_state(engine) -> None:
    """Forget Adam's moments and step counts (FLIP's unmasked tuning starts from fresh state).

    Zeroed in place: ZeRO keeps views into these flat buffers, so replacing them would detach
    the partitions from the optimizer.
    """
    for state in engine.basic_optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
