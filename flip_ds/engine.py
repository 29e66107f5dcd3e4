"""The DeepSpeed engine: initialised with the optimizer's parameter groups; lr and state control."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flip_ds import distributed
from flip_ds.config import BatchSplit, Recipe
from flip_ds.engine_config import deepspeed_config
from flip_ds.models.flip import FLIP, decay_exempt


def parameter_groups(model: FLIP, weight_decay: float, no_decay: str) -> list[dict[str, Any]]:
    """AdamW's two groups: decayed, and spared by the `no_decay` rule (flip_ds.models.flip.decay_exempt)."""
    exempt = decay_exempt(model, no_decay)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in trained if name not in exempt], "weight_decay": weight_decay},
            {"params": [p for name, p in trained if name in exempt], "weight_decay": 0.0}]


def initialize(model: nn.Module, recipe: Recipe, split: BatchSplit, device: str, precision: str,
               load_universal: bool = False):  # -> DeepSpeedEngine
    """`split`: the first step's micro batch and accumulation (set_batch_split changes them).
    `precision`: 'bf16' or 'fp32', the recipe's choice resolved for the hardware (flip_ds.precision).
    `load_universal`: the checkpoint to be loaded is a universal one (saved on another world size)."""
    import deepspeed

    config = deepspeed_config(recipe, split, device, precision)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    groups = parameter_groups(model, recipe.optim.weight_decay, recipe.optim.no_decay)
    logit_scale = model.logit_scale.detach().float().clone()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    if precision != "fp32":  # DeepSpeed made the fp32 master from the bf16 cast: give it the exact value
        _set_fp32_master(engine.module.logit_scale, logit_scale.to(engine.device))
    refresh_fp32_logit_scale(engine)
    return engine


def _set_fp32_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write `value` into the optimizer's fp32 master of `param` (no collective).

    Under ZeRO-3 each rank writes the slice it holds, at its rank in the parameter's partition
    group; DeepSpeed's setter reads past the end of `value` on a rank whose slice is only padding
    (a 1-element parameter on 2+ ranks), and such a rank has nothing to write.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "ds_tensor"):
        if distributed.rank(param.ds_process_group) * param.ds_tensor.numel() >= param.ds_numel:
            return
    elif not hasattr(param, "_hp_mapping"):
        raise _no_fp32_master()
    safe_set_full_fp32_param(param, value)


def _no_fp32_master() -> RuntimeError:
    # engine_config refuses bf16 without ZeRO, so only a DeepSpeed that changed its internals gets here
    return RuntimeError("the logit scale has no fp32 master in this DeepSpeed optimizer "
                        "(safe_get_full_fp32_param found none): bf16 needs ZeRO stage 1, 2 or 3")


def load_checkpoint(engine, directory: str, tag: str) -> dict[str, Any]:
    """Weights and optimizer state from a DeepSpeed checkpoint; returns its client state. The lr is
    the plan's, so the scheduler state is not read, and the clipping is the recipe's: ZeRO-1/2
    replace it with the checkpoint's on load, so a run resumed with a new `optim.grad_clip` (say,
    added after a spike) would silently keep the old one."""
    _, client = engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=False)
    engine.optimizer.clip_grad = engine.gradient_clipping()  # the engine JSON's, written from the recipe
    refresh_fp32_logit_scale(engine)
    return client


def refresh_fp32_logit_scale(engine) -> None:
    """Hand the model the optimizer's fp32 master value of the logit scale (a no-op in fp32).

    Call it on every rank (under ZeRO the master is partitioned and gathered) after each update
    and after loading a checkpoint; FLIP.scale computes with it, so tau moves as it would in fp32.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module
    if model.logit_scale.dtype != torch.float32:
        master = safe_get_full_fp32_param(model.logit_scale)
        if master is None:
            raise _no_fp32_master()
        model.fp32_logit_scale = master.detach().clone()


def want_grad_norm(engine, wanted: bool) -> None:
    """Have DeepSpeed's next step compute the gradient norm only if `wanted` (a step that logs it),
    where skipping it gives nothing up.

    The norm costs a pass over the gradients in fp64 (docs/benchmarks.md, "Per-step overhead"), and
    DeepSpeed's only switch for it is ZeRO-1/2's `compute_grad_norm`, which its optimizer reads at
    every step. It is dropped only where it is neither the clip nor the skip: no clipping, and the
    overflow scan on (bf16), which then skips an update with non-finite gradients by itself; and
    not with the optimizer offloaded, which DeepSpeed does not allow without the norm. fp32 (where
    the norm is that skip), clipping, offload and ZeRO-3 compute it at every step.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    # clip_grad is read at each call: it is the optimizer's, which load_checkpoint sets back to the recipe's
    if (isinstance(optimizer, DeepSpeedZeroOptimizer) and optimizer.check_grad_overflow and optimizer.clip_grad == 0
            and not optimizer.cpu_offload):
        optimizer.compute_grad_norm = wanted and engine.zero_compute_grad_norm()  # the JSON may turn it off


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
