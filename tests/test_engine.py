"""Engine pieces under the real DeepSpeed engine: ZeRO-3 partitioning, non-finite steps, the
optimizer reset, activation checkpointing's memory, and the phase / lr plan."""

from __future__ import annotations

import gc
import json
import math

import deepspeed
import pytest
import torch

from flip_ds.config import BatchSplit, load_recipe
from flip_ds.config_loader import ConfigError
from flip_ds.engine import initialize, reset_optimizer_state
from flip_ds.engine_config import deepspeed_config, validate_for_launch
from flip_ds.memory import saved_activation_bytes
from flip_ds.metrics import Stopwatch
from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import FLIP, build_model
from flip_ds.schedule import PhasePlan
from flip_ds.step import contrastive_step
from tests.distributed_helpers import REPO, run_on_ranks
from tests.engine_helpers import ZERO3_PARTITION_ALL, synthetic_batches, tiny_recipe


def _engine(tmp, *overrides):
    recipe = tiny_recipe(tmp, "train.global_batch=16", "train.micro_batch=8", *overrides)
    torch.manual_seed(0)
    return initialize(build_model(recipe.model, vocab_size=100), recipe, BatchSplit(recipe.train.micro_batch, 1),
                      device="cpu", precision=recipe.train.precision)


def _step(engine, rank, step, images=None):
    batch = synthetic_batches(rank, 1, 8)[0]
    if images is not None:
        batch = (images, batch[1])
    return contrastive_step(engine, [batch], image_mask=0.5, text_mask=0.0, seed=0, rank=rank, step=step,
                            device="cpu", stop_requested=False, watch=Stopwatch())


def _partition_check(rank: int, world: int, tmp) -> None:
    engine = _engine(tmp / f"r{rank}", "train.precision=bf16")
    params = list(engine.module.parameters())
    held = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    assert total == sum(p.numel() for p in FLIP(ModelConfig(name="tiny"), 100).parameters())
    for p in params:  # every parameter, the 1-element temperature included, is split in two
        assert p.ds_tensor.numel() == -(-p.ds_numel // world), p.ds_numel
        assert p.numel() == 0  # released outside forward
    assert abs(held - total / world) <= len(params)
    assert _step(engine, rank, 0).stepped
    assert all(p.numel() == 0 for p in params)  # still released after a full step
    engine.destroy()


def test_zero3_each_rank_holds_half_of_every_parameter(tmp_path):
    run_on_ranks(_partition_check, 2, tmp_path)


ZERO1 = {"zero_optimization": {"stage": 1}}
ZERO2 = {"zero_optimization": {"stage": 2}}


def _clipping_check(rank: int, world: int, tmp) -> None:
    for zero in (ZERO2, None):  # ZeRO-2, then the default ZeRO-3: each stage's optimizer clips itself
        for clip in (0.0, 0.5):
            recipe = tiny_recipe(tmp / f"r{rank}-{clip}-{zero is None}", "train.global_batch=16", "train.micro_batch=8",
                                 "train.precision=bf16", f"optim.grad_clip={clip}", zero=zero)
            engine = initialize(build_model(recipe.model, vocab_size=100), recipe,
                                BatchSplit(recipe.train.micro_batch, 1), device="cpu", precision=recipe.train.precision)
            assert engine.optimizer.clip_grad == clip  # DeepSpeed >= 0.19 clips at 1.0 unless told otherwise
            assert _step(engine, rank, 0).stepped
            engine.destroy()


def test_the_recipes_grad_clip_reaches_the_optimizer_zero_meaning_none(tmp_path):
    run_on_ranks(_clipping_check, 2, tmp_path)


def _nan_gradient_check(rank: int, world: int, tmp) -> None:
    for zero, precision in ((ZERO2, "bf16"), (ZERO3_PARTITION_ALL, "bf16"), (ZERO1, "fp32")):
        name = f"zero{zero['zero_optimization']['stage']}-{precision}"
        recipe = tiny_recipe(tmp / f"{name}-r{rank}", "train.global_batch=16", "train.micro_batch=8",
                             f"train.precision={precision}", zero=zero)
        torch.manual_seed(0)
        engine = initialize(build_model(recipe.model, vocab_size=100), recipe,
                            BatchSplit(recipe.train.micro_batch, 1), device="cpu", precision=precision)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            before = [p.detach().clone() for p in params]
        if rank == 0:  # a finite loss whose gradient is not: only DeepSpeed's check of the gradients can catch it
            hook = engine.module.visual.patch_embed.proj.weight.register_hook(
                lambda g: torch.full_like(g, float("nan")))
        outcome = _step(engine, rank, 0)
        # flip-ds saw a finite loss, DeepSpeed skipped the update on every rank, and the step says so
        assert outcome.nonfinite_grad and not outcome.stepped and not outcome.nonfinite, name
        with deepspeed.zero.GatheredParameters(params):
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), name
        if rank == 0:
            hook.remove()
        assert _step(engine, rank, 1).stepped, name  # and the next step trains normally
        engine.destroy()


def test_a_nan_gradient_from_a_finite_loss_is_skipped_and_reported_by_every_stage_and_precision(tmp_path):
    run_on_ranks(_nan_gradient_check, 2, tmp_path)


def _nonfinite_check(rank: int, world: int, tmp) -> None:
    engine = _engine(tmp / f"r{rank}", "train.precision=fp32")
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params):
        before = [p.detach().clone() for p in params]
    images = synthetic_batches(rank, 1, 8)[0][0]
    if rank == 1:  # only one rank sees the bad batch: both must skip, or the collectives would hang
        images = images.clone()
        images[0, 0, 0, 0] = float("nan")
    outcome = _step(engine, rank, 0, images)
    assert outcome.nonfinite and not outcome.stepped
    with deepspeed.zero.GatheredParameters(params):
        assert all(torch.equal(p, b) for p, b in zip(params, before))  # no update happened
    assert _step(engine, rank, 1).stepped  # and the next finite step trains normally
    engine.destroy()


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_all(tmp_path):
    run_on_ranks(_nonfinite_check, 2, tmp_path)


def _reset_check(rank: int, world: int, tmp) -> None:
    engine = _engine(tmp / f"r{rank}", "train.precision=bf16")
    _step(engine, rank, 0)
    state = engine.basic_optimizer.state
    assert any(float(s["exp_avg"].abs().sum()) > 0 for s in state.values())
    reset_optimizer_state(engine)
    for s in state.values():
        assert float(s["exp_avg"].abs().sum()) == 0 and float(s["exp_avg_sq"].abs().sum()) == 0
        assert int(s["step"]) == 0
    assert _step(engine, rank, 1).stepped  # Adam restarts from fresh moments without error
    engine.destroy()


def test_optimizer_reset_zeroes_adam_state_under_zero3(tmp_path):
    run_on_ranks(_reset_check, 2, tmp_path)


@pytest.mark.parametrize("name,batch", [("tiny", 8), ("B/16", 2)])
def test_activation_checkpointing_cuts_saved_activations(name, batch):
    """The recipe switch takes effect: what autograd keeps for backward drops several-fold."""
    size = ModelConfig(name=name).resolved_image_size
    images, tokens = torch.randn(batch, 3, size, size), torch.randint(4, 100, (batch, 32))
    saved = {}
    for ac in (False, True):
        torch.manual_seed(0)
        model = FLIP(ModelConfig(name=name, activation_checkpointing=ac), vocab_size=100)
        out, saved[ac] = saved_activation_bytes(lambda m=model: m(images, tokens, 0.5), model.parameters())
        sum(t.sum() for t in out).backward()  # and it still back-propagates
    assert saved[True] < saved[False] / 4, saved


def test_measuring_saved_activations_frees_them_afterwards():
    """A forward measured without a backward (the bench's largest-batch search) leaves nothing
    alive: each measurement used to leak its whole graph, which ran a 2-rank B/16 search out of
    host memory."""
    torch.manual_seed(0)
    model = FLIP(ModelConfig(name="tiny"), vocab_size=100)
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(4, 100, (4, 12))

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    measured = saved_activation_bytes(lambda: model(images, tokens, 0.5), model.parameters())[1]
    assert measured > images.numel() * images.element_size()  # the patch embedding alone saves the images
    before = live_tensors()
    for _ in range(3):
        assert saved_activation_bytes(lambda: model(images, tokens, 0.5), model.parameters())[1] == measured
    assert live_tensors() == before


def test_phase_plan_lr_warmup_cosine_and_switch():
    recipe = load_recipe("configs/tiny_cpu.yaml", [
        "train.global_batch=64", "optim.base_lr=2.56e-3",
        "phases=[{name: a, samples: 640, warmup_samples: 128}, {name: b, samples: 130, base_lr: 2.56e-4}]"])
    plan = PhasePlan(recipe.phases, recipe.optim, 64)
    assert plan.total_steps == 10 + 3  # a phase that does not divide rounds up to whole steps
    assert [plan.span_at(s).index for s in (0, 9, 10, 12)] == [0, 0, 1, 1]
    peak = 2.56e-3 * 64 / 256
    assert plan.lr_at(0) == pytest.approx(peak * 64 / 192)  # linear warmup, counted in samples
    assert plan.lr_at(1) == pytest.approx(peak * 128 / 192)
    assert plan.lr_at(2) == pytest.approx(peak)  # warmup done: cosine starts at the peak
    assert plan.lr_at(9) == pytest.approx(peak * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
    assert plan.lr_at(10) == pytest.approx(peak / 10)  # phase b: its own peak, no warmup


def _fp32_logit_scale_check(rank: int, world: int, tmp) -> None:
    """Adam's first step moves a parameter by lr (g / |g|), so the logit scale must move by exactly
    lr = 1e-3. Its bf16 copy could not: at log(1/0.07) = 2.66 bf16 values are 0.0156 apart.
    Every stage the recipes use: ZeRO-1 (most paper recipes), ZeRO-2, ZeRO-3 with the logit scale
    partitioned, and the shipped zero3.json, whose persistence threshold keeps it resident."""
    from flip_ds.engine import load_checkpoint, set_lr

    lr = 1e-3
    shipped_zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    for name, zero in (("zero1", ZERO1), ("zero2", ZERO2), ("zero3", ZERO3_PARTITION_ALL),
                       ("zero3_shipped", shipped_zero3)):
        recipe = tiny_recipe(tmp / name / f"r{rank}", "train.global_batch=16", "train.micro_batch=8",
                             "train.precision=bf16", "optim.weight_decay=0", zero=zero)
        torch.manual_seed(0)
        engine = initialize(build_model(recipe.model, vocab_size=100), recipe,
                            BatchSplit(recipe.train.micro_batch, 1), device="cpu", precision=recipe.train.precision)
        assert engine.module.logit_scale.dtype == torch.bfloat16, name  # DeepSpeed cast the parameter ...
        set_lr(engine, lr)
        first = _step(engine, rank, 0)
        assert 1 / first.temperature == pytest.approx(1 / 0.07, rel=1e-6), name  # ... forward uses the fp32 value
        second = _step(engine, rank, 1)
        moved = math.log(first.temperature / second.temperature)
        assert abs(moved) == pytest.approx(lr, rel=1e-3), (name, moved)
        engine.save_checkpoint(str(tmp / name / "ckpt"), tag="two")  # after two updates; every rank writes its part
        set_lr(engine, 0.0)
        saved = _step(engine, rank, 2).temperature
        engine.destroy()

        torch.manual_seed(1)  # another init: the checkpoint must bring the fp32 value back
        again = initialize(build_model(recipe.model, vocab_size=100), recipe,
                           BatchSplit(recipe.train.micro_batch, 1), device="cpu", precision=recipe.train.precision)
        load_checkpoint(again, str(tmp / name / "ckpt"), "two")
        set_lr(again, 0.0)
        assert _step(again, rank, 2).temperature == pytest.approx(saved, rel=1e-6), name
        again.destroy()


def test_the_logit_scale_trains_in_fp32_under_bf16_on_every_zero_stage(tmp_path):
    run_on_ranks(_fp32_logit_scale_check, 2, tmp_path)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_without_zero_is_refused_in_one_line(tmp_path, precision):
    """Stage 0's bf16 optimizer has no fp32 master for the logit scale to train in; in fp32 nothing
    would skip a non-finite gradient; and its checkpoints are not ZeRO checkpoints to export."""
    recipe = tiny_recipe(tmp_path, "train.global_batch=16", "train.micro_batch=8",
                         zero={"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="is ZeRO stage 0, which flip-ds does not train under"):
        deepspeed_config(recipe, BatchSplit(8, 1), "cpu", precision)
    with pytest.raises(ConfigError, match="is ZeRO stage 0"):  # before any process starts
        validate_for_launch(recipe, 2)
    silent = tiny_recipe(tmp_path / "silent", zero={"steps_per_print": 10})  # DeepSpeed's default: stage 0
    with pytest.raises(ConfigError, match=r"is ZeRO stage 0 \(it sets no zero_optimization.stage\)"):
        validate_for_launch(silent, 2)
