"""What the per-step cuts keep, under the real DeepSpeed engine on 2 ranks: the step reads one
value back to the host (the agreed flags) and the loss only when asked; a non-finite loss, a stop
and an abort on one rank are agreed by every rank; clipping scales the gradient Adam sees; and
DeepSpeed's grad norm, where a JSON switches it off, still leaves a non-finite gradient skipped
(bf16) or is refused (fp32). And the tool that measures the step still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from flip_ds import distributed
from flip_ds.config import BatchSplit
from flip_ds.config_loader import ConfigError
from flip_ds.engine import initialize, load_checkpoint, reset_optimizer_state, set_batch_split
from flip_ds.metrics import Stopwatch
from flip_ds.models.flip import build_model
from flip_ds.step import contrastive_step
from tests.distributed_helpers import REPO, free_port, run_on_ranks
from tests.engine_helpers import ZERO3_PARTITION_ALL, synthetic_batches, tiny_recipe

ZERO1 = {"zero_optimization": {"stage": 1}}
ZERO1_NO_NORM = {"zero_optimization": {"stage": 1, "compute_grad_norm": False}}
# Ways a tensor's value reaches Python: each one waits for the device on a GPU
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _engine(tmp, zero: dict, *overrides: str, precision: str = "bf16"):
    recipe = tiny_recipe(tmp, "train.global_batch=16", "train.micro_batch=8", f"train.precision={precision}",
                         *overrides, zero=zero)
    torch.manual_seed(0)
    return initialize(build_model(recipe.model, vocab_size=100), recipe, BatchSplit(recipe.train.micro_batch, 1),
                      device="cpu", precision=precision), recipe


def _step(engine, rank: int, step: int, k: int = 1, images: torch.Tensor | None = None, grad_norm: bool = True,
          **flags: bool):
    batches = synthetic_batches(rank, k, 8 // k)
    if images is not None:
        batches = [(images, batches[0][1])]
    return contrastive_step(engine, batches, image_mask=0.5, text_mask=0.0, seed=0, rank=rank, step=step,
                            device="cpu", stop_requested=flags.get("stop", False),
                            abort_requested=flags.get("abort", False), watch=Stopwatch(), grad_norm=grad_norm)


@contextmanager
def host_reads_in(module_file: str) -> Iterator[list[str]]:
    """The tensor-to-Python reads made by code in `module_file`, by name, while the block runs."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str, read):
        def counted(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(module_file):
                reads.append(name)
            return read(self, *args, **kwargs)
        return counted

    for name, read in originals.items():
        setattr(torch.Tensor, name, counting(name, read))
    try:
        yield reads
    finally:
        for name, read in originals.items():
            setattr(torch.Tensor, name, read)


def _weights_and_moments(engine) -> list[torch.Tensor]:
    """This rank's weights and Adam moments, copied (ZeRO-1 keeps whole weights on every rank)."""
    state = [t for s in engine.basic_optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    return [t.detach().clone() for t in [*engine.module.parameters(), *state]]


def _unchanged(engine, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_weights_and_moments(engine), before, strict=True))


def _host_reads_check(rank: int, world: int, tmp) -> None:
    engine, _ = _engine(tmp / f"r{rank}", ZERO1)
    for step, k in enumerate((1, 2)):  # a plain step, then the feature cache's accumulation
        set_batch_split(engine, BatchSplit(8 // k, k), 16)
        with host_reads_in("flip_ds/step.py") as reads:
            outcome = _step(engine, rank, step, k)
        assert outcome.stepped and reads == ["tolist"], (k, reads)  # the agreed flags, nothing else
        with host_reads_in("flip_ds/step.py") as reads:
            assert outcome.loss > 0 and 0.01 <= outcome.temperature <= 1.0
        assert reads == ["item", "item"]  # read when a log step asks for them
    engine.destroy()


def test_the_step_reads_the_host_once_and_the_loss_only_when_asked(tmp_path):
    run_on_ranks(_host_reads_check, 2, tmp_path)


def _agreement_check(rank: int, world: int, tmp) -> None:
    engine, _ = _engine(tmp / f"r{rank}", ZERO1)
    assert _step(engine, rank, 0).stepped  # Adam has moments to keep from here on
    before = _weights_and_moments(engine)
    images = synthetic_batches(rank, 1, 8)[0][0].clone()
    if rank == 1:  # one rank's batch gives a NaN loss: every rank skips, or the collectives would hang
        images[0, 0, 0, 0] = float("nan")
    outcome = _step(engine, rank, 1, images=images)
    assert outcome.nonfinite and not outcome.stepped and not (outcome.stop or outcome.abort)
    assert _unchanged(engine, before)  # weights and Adam moments on every rank
    for flag, asking in (("stop", 1), ("abort", 0)):  # one rank asks; every rank learns it, none updates
        outcome = _step(engine, rank, 2, **{flag: rank == asking})
        assert getattr(outcome, flag) and not outcome.stepped and not outcome.nonfinite, flag
        assert _unchanged(engine, before), flag
    assert _step(engine, rank, 2).stepped and not _unchanged(engine, before)  # and training goes on
    engine.destroy()


def test_a_nonfinite_loss_stop_or_abort_on_one_rank_is_agreed_by_every_rank_bf16_zero1(tmp_path):
    run_on_ranks(_agreement_check, 2, tmp_path)


def _first_moment_norm(engine) -> float:
    """||Adam's first moment|| over the whole model (each rank holds a partition of it)."""
    local = sum(float(s["exp_avg"].double().pow(2).sum()) for s in engine.basic_optimizer.state.values())
    return float(distributed.all_reduce(torch.tensor([local], dtype=torch.float64))[0]) ** 0.5


def _clipping_check(rank: int, world: int, tmp) -> None:
    """After the first step Adam's first moment is (1 - beta1) x the gradient it was given, so its
    norm shows whether that gradient was clipped to the recipe's `grad_clip`."""
    for name, zero in (("zero1", ZERO1), ("zero3", ZERO3_PARTITION_ALL)):
        for clip in (0.0, 1e-3):
            engine, recipe = _engine(tmp / f"{name}-{clip}-r{rank}", zero, f"optim.grad_clip={clip}")
            assert _step(engine, rank, 0).stepped
            norm = float(engine.get_global_grad_norm())  # before clipping, the same on every rank
            assert norm > 100 * clip, (name, norm)
            expected = (1 - recipe.optim.betas[0]) * (min(norm, clip) if clip else norm)
            assert _first_moment_norm(engine) == pytest.approx(expected, rel=1e-4), (name, clip)
            engine.destroy()


def test_clipping_scales_the_gradient_adam_sees_on_zero1_and_zero3(tmp_path):
    run_on_ranks(_clipping_check, 2, tmp_path)


def _no_grad_norm_check(rank: int, world: int, tmp) -> None:
    engine, _ = _engine(tmp / f"r{rank}", ZERO1_NO_NORM)
    before = _weights_and_moments(engine)
    if rank == 0:  # a finite loss whose gradient is not: only DeepSpeed's overflow scan can catch it
        engine.module.visual.patch_embed.proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    outcome = _step(engine, rank, 0)
    assert _unchanged(engine, before) and outcome.nonfinite_grad  # skipped on every rank, and reported
    assert engine.get_global_grad_norm() is None  # what train/grad_norm then logs as NaN
    engine.destroy()
    with pytest.raises(ValueError, match="compute_grad_norm=false requires gradient_clipping=0"):
        _engine(tmp / f"clip-r{rank}", ZERO1_NO_NORM, "optim.grad_clip=1.0")  # clipping is never dropped


def test_without_deepspeeds_grad_norm_bf16_still_skips_a_nonfinite_gradient(tmp_path):
    run_on_ranks(_no_grad_norm_check, 2, tmp_path)


def _grad_norm_when_logged_check(rank: int, world: int, tmp) -> None:
    """bf16 ZeRO-1 without clipping skips the norm on the steps that do not log it, and trains
    exactly as with it; a NaN gradient on such a step is still skipped. fp32 and clipping keep it."""
    logged, always = _engine(tmp / f"logged-r{rank}", ZERO1)[0], _engine(tmp / f"always-r{rank}", ZERO1)[0]
    for step, logs in enumerate((False, True, False)):
        assert _step(logged, rank, step, grad_norm=logs).stepped and _step(always, rank, step).stepped
        norm = logged.get_global_grad_norm()
        assert (norm is None) if not logs else float(norm) == float(always.get_global_grad_norm()) > 0, (step, norm)
    # the norm changes no update without clipping: both engines hold the same weights and moments
    assert all(torch.equal(a, b) for a, b in zip(_weights_and_moments(logged), _weights_and_moments(always),
                                                  strict=True))
    before = _weights_and_moments(logged)
    if rank == 0:  # a finite loss whose gradient is not, on a step that does not log
        logged.module.visual.patch_embed.proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    outcome = _step(logged, rank, 3, grad_norm=False)
    assert _unchanged(logged, before) and outcome.nonfinite_grad  # the overflow scan skipped it on every rank
    for engine in (logged, always):
        engine.destroy()
    for name, overrides, precision in (("fp32", (), "fp32"), ("clip", ("optim.grad_clip=1.0",), "bf16")):
        engine, _ = _engine(tmp / f"{name}-r{rank}", ZERO1, *overrides, precision=precision)
        assert _step(engine, rank, 0, grad_norm=False).stepped
        assert engine.get_global_grad_norm() is not None, name  # the skip (fp32) or the clip needs it
        engine.destroy()


def test_deepspeeds_grad_norm_only_on_logging_steps_where_it_is_neither_clip_nor_skip(tmp_path):
    run_on_ranks(_grad_norm_when_logged_check, 2, tmp_path)


def _resumed_clip_check(rank: int, world: int, tmp) -> None:
    """A run resumed with another `optim.grad_clip` clips as its recipe says, not as the
    checkpoint's run did (DeepSpeed's ZeRO-1/2 load the checkpoint's value), both ways."""
    for saved_clip, resumed_clip in ((0.0, 1e-3), (1e-3, 0.0)):
        where = tmp / f"{saved_clip}-{resumed_clip}"
        engine, _ = _engine(where / f"saved-r{rank}", ZERO1, f"optim.grad_clip={saved_clip}")
        assert _step(engine, rank, 0).stepped
        engine.save_checkpoint(str(where / "ckpt"), tag="one")
        engine.destroy()
        resumed, recipe = _engine(where / f"resumed-r{rank}", ZERO1, f"optim.grad_clip={resumed_clip}")
        load_checkpoint(resumed, str(where / "ckpt"), "one")
        reset_optimizer_state(resumed)  # so that Adam's first moment holds only the next step's gradient
        assert _step(resumed, rank, 1).stepped
        norm = float(resumed.get_global_grad_norm())  # before clipping
        assert norm > 100 * 1e-3
        expected = (1 - recipe.optim.betas[0]) * (min(norm, resumed_clip) if resumed_clip else norm)
        assert _first_moment_norm(resumed) == pytest.approx(expected, rel=1e-4), (saved_clip, resumed_clip)
        resumed.destroy()


def test_a_resumed_run_clips_as_its_recipe_says_not_as_its_checkpoint(tmp_path):
    run_on_ranks(_resumed_clip_check, 2, tmp_path)


def test_without_deepspeeds_grad_norm_fp32_is_refused_in_one_line(tmp_path):
    """In fp32 the norm is DeepSpeed's only check of the gradients: without it a NaN gradient
    from a finite loss reaches the weights."""
    with pytest.raises(ConfigError, match="compute_grad_norm false, which in fp32"):
        _engine(tmp_path, ZERO1_NO_NORM, precision="fp32")


@pytest.mark.parametrize("zero", [1, 3])
def test_the_overhead_tool_still_finds_every_phase_it_times(zero):
    """tools/step_overhead.py times DeepSpeed's step by wrapping its methods by name: a DeepSpeed
    that renames one fails here, not in the middle of a measurement."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                          str(free_port()), "tools/step_overhead.py", "--zero", str(zero), "--masks", "0.5",
                          "--steps", "1", "--rounds", "1", "--breakdown-steps", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "grad norm" in out.stdout and "logit-scale fp32 refresh" in out.stdout and "vs shipped" in out.stdout
