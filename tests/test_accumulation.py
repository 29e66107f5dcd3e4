"""Feature-cache accumulation under the real ZeRO-3 engine equals one big batch: same loss, same
update, also when a run switches to it after an odd number of steps without it."""

from __future__ import annotations

import deepspeed
import torch

from flip_ds.config import BatchSplit
from flip_ds.engine import initialize, reset_optimizer_state, set_batch_split
from flip_ds.metrics import Stopwatch
from flip_ds.models.flip import build_model
from flip_ds.step import contrastive_step
from tests.distributed_helpers import run_on_ranks
from tests.engine_helpers import synthetic_batches, tiny_recipe

PER_RANK = 8


def one_step(tmp, rank: int, k: int):
    # Adam's first step is lr * g / (|g| + eps): with a huge eps the update is linear in the
    # gradient, so comparing updates compares gradients (scale included) across ZeRO partitions.
    recipe = tiny_recipe(tmp, "train.precision=fp32", f"train.global_batch={2 * PER_RANK}",
                         f"train.micro_batch={PER_RANK // k}", "optim.eps=1000.0", "optim.weight_decay=0.0",
                         "model.activation_checkpointing=true")
    torch.manual_seed(0)
    model = build_model(recipe.model, vocab_size=100)
    engine = initialize(model, recipe, BatchSplit(PER_RANK // k, k), device="cpu", precision="fp32")
    for group in engine.optimizer.param_groups:
        group["lr"] = 1000.0  # with eps 1000 the update is about the gradient itself
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params):
        before = [p.detach().clone() for p in params]
    images, tokens = synthetic_batches(rank, 1, PER_RANK)[0]
    split = [(images[j::k], tokens[j::k]) for j in range(k)]  # the same samples, in k micro batches
    # mask 0: no randomness, so the only difference between k=1 and k=2 is how the batch is split
    out = contrastive_step(engine, split, image_mask=0.0, text_mask=0.0, seed=0, rank=rank, step=0, device="cpu",
                           stop_requested=False, watch=Stopwatch())
    with deepspeed.zero.GatheredParameters(params):
        update = [p.detach() - b for p, b in zip(params, before)]
    engine.destroy()
    return out, update


def _check(rank: int, world: int, tmp) -> None:
    out1, upd1 = one_step(tmp / "k1", rank, 1)
    out2, upd2 = one_step(tmp / "k2", rank, 2)
    assert out1.stepped and out2.stepped
    assert abs(out1.loss - out2.loss) < 1e-5, (out1.loss, out2.loss)
    for a, b in zip(upd1, upd2):
        scale = float(a.abs().max())
        assert scale > 0  # every parameter moved, the temperature included
        assert float((a - b).abs().max()) <= 1e-3 * scale, (float((a - b).abs().max()), scale)


def test_feature_cache_accumulation_matches_big_batch(tmp_path):
    run_on_ranks(_check, 2, tmp_path)


def _second_update(tmp, rank: int, k: int, zero: dict | None) -> list[torch.Tensor]:
    """The update of a step in `k` micro batches (as a phase with its own micro_batch runs) that
    follows one step without accumulation. With Adam's eps huge (as in one_step) and its state
    reset between the steps, the update is about the step's own gradient."""
    recipe = tiny_recipe(tmp, "train.precision=fp32", f"train.global_batch={2 * PER_RANK}",
                         f"train.micro_batch={PER_RANK}", "optim.eps=1000.0", "optim.weight_decay=0.0", zero=zero)
    torch.manual_seed(0)
    engine = initialize(build_model(recipe.model, vocab_size=100), recipe, BatchSplit(PER_RANK, 1), device="cpu",
                        precision="fp32")
    for group in engine.optimizer.param_groups:
        group["lr"] = 1000.0
    params = [p for p in engine.module.parameters() if p.requires_grad]
    weights = []
    for step, (images, tokens) in enumerate(synthetic_batches(rank, 2, PER_RANK)):
        split = BatchSplit(PER_RANK // k, k) if step == 1 else BatchSplit(PER_RANK, 1)
        set_batch_split(engine, split, 2 * PER_RANK)
        micro = [(images[j::split.accum], tokens[j::split.accum]) for j in range(split.accum)]
        assert contrastive_step(engine, micro, image_mask=0.0, text_mask=0.0, seed=0, rank=rank, step=step,
                                device="cpu", stop_requested=False, watch=Stopwatch()).stepped
        with deepspeed.zero.GatheredParameters(params):
            weights.append([p.detach().clone() for p in params])
        reset_optimizer_state(engine)  # the next update from its own gradient only (as an unmasked phase starts)
    engine.destroy()
    return [after - before for before, after in zip(*weights, strict=True)]


def _switch_check(rank: int, world: int, tmp) -> None:
    for zero in (None, {"zero_optimization": {"stage": 1}}):  # ZeRO-3 (tiny_recipe's), ZeRO-1
        name = "zero1" if zero else "zero3"
        whole = _second_update(tmp / f"{name}-k1", rank, 1, zero)
        cut = _second_update(tmp / f"{name}-k2", rank, 2, zero)
        scale = max(float(a.abs().max()) for a in whole)  # per tensor, the small ones would meet fp32's rounding
        worst = max(float((a - b).abs().max()) for a, b in zip(whole, cut, strict=True))
        assert worst <= 1e-3 * scale, (name, worst, scale)


def test_accumulation_after_an_odd_number_of_plain_steps_updates_once_per_step_on_the_whole_batch(tmp_path):
    """DeepSpeed counts micro steps from the run's start: left to itself, its boundary after one
    plain step would fall after the first micro batch of the next, and update on half a batch."""
    run_on_ranks(_switch_check, 2, tmp_path)
