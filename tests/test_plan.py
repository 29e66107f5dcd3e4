"""The planner against DeepSpeed's own estimators and against activations measured on this machine;
the paper recipes against the paper's schedule and against the planner."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flip_ds.cli import main
from flip_ds.config import IMAGENET_EPOCH, load_recipe
from flip_ds.loss import contrastive_loss
from flip_ds.memory import saved_activation_bytes
from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import FLIP
from flip_ds.plan import ZeroSetup, activations, model_states, parameter_counts

REPO = Path(__file__).resolve().parent.parent
PAPER_RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "tiny_cpu.yaml")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", ["tiny", "B/16", "H/14"])
def test_model_states_equal_deepspeeds_estimators(name):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = parameter_counts(ModelConfig(name=name), 32000)
    for nodes, per_node in ((1, 1), (1, 8), (8, 8), (64, 8)):
        world = nodes * per_node
        for offload in (False, True):
            _, ds2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=offload)
            ours = model_states(total, largest, ZeroSetup(2, offload), "bf16", world, per_node)
            assert ours.total == pytest.approx(ds2, abs=4), (name, world, offload)
            for offload_params in (False, True) if offload else (False,):
                _, ds3, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=offload,
                                                                  cpu_offload_params=offload_params)
                ours = model_states(total, largest, ZeroSetup(3, offload, offload_params), "bf16", world, per_node)
                assert ours.total == pytest.approx(ds3, abs=4), (name, world, offload, offload_params)


def test_parameter_counts_on_the_meta_device_are_deepspeeds_counts_of_the_real_model():
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = ModelConfig(name="tiny")
    assert parameter_counts(cfg, 1000) == model_to_params(FLIP(cfg, 1000))


def test_zero_setup_reads_stage_offload_and_deepspeeds_default_buckets():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    assert ZeroSetup.from_engine_json({"zero_optimization": {"stage": 2}}).bucket_elements == (
        defaults.reduce_bucket_size + defaults.allgather_bucket_size)
    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    setup = ZeroSetup.from_engine_json(offload)
    assert (setup.stage, setup.offload_optimizer, setup.offload_params) == (3, True, False)
    assert setup.bucket_elements == int(5e7 + 5e7)


@pytest.mark.parametrize("name", ["tiny", "B/16"])
def test_activation_estimate_is_within_15_percent_of_what_autograd_saves(name):
    """Measured with saved-tensor hooks on a real bf16 forward + contrastive loss, micro batch 2,
    masked and unmasked, with and without activation checkpointing."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name)
    with torch.device("meta"):  # what is saved depends on shapes, not values: skip initialising the weights
        model = FLIP(cfg, vocab_size=1000)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    micro = 2
    side = cfg.resolved_image_size
    images = torch.randn(micro, 3, side, side, dtype=torch.bfloat16)
    tokens = torch.randint(4, 1000, (micro, cfg.context_length))
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = 2, 3, 0
    for checkpointing in (False, True):
        model.visual.activation_checkpointing = model.text.activation_checkpointing = checkpointing
        for mask in (0.5, 0.0):
            def step(mask: float = mask) -> torch.Tensor:
                # the fused kernel GPUs train with (the planner's subject), not the CPU training path's eager one
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return contrastive_loss(*model(images, tokens, mask))

            _, measured = saved_activation_bytes(step, exclude=list(model.parameters()))
            estimate = activations(cfg, micro, mask, "bf16", rows=micro, columns=micro, checkpointing=checkpointing)
            assert estimate.saved == pytest.approx(measured, rel=0.15), (checkpointing, mask, measured)


def test_plan_json_fits_splits_the_batch_and_costs_the_samples():
    recipe = str(REPO / "configs" / "flip_h14_laion2b_25.6b.yaml")
    status, out, _ = run_cli("plan", recipe, "--gpus", "256", "--gpu-mem", "80", "--json")
    assert status == 0
    plan = json.loads(out)
    assert plan["fits"] and plan["accum_steps"] == 65536 // (256 * 128) and plan["zero"]["stage"] == 2
    assert plan["max_micro_batch"] >= plan["micro_batch"] and plan["max_micro_accum"] * plan["max_micro_batch"] == 256
    masked, tuning = plan["phases"]
    assert masked["samples"] == math.ceil(20_000 * IMAGENET_EPOCH / 65536) * 65536
    # the unmasked phase runs twice the image tokens: more FLOPs and more activation memory per sample
    assert tuning["train_gflops_per_sample"] > 1.8 * masked["train_gflops_per_sample"]
    assert tuning["activations_no_checkpointing"]["image"] > 1.8 * masked["activations_no_checkpointing"]["image"]
    seconds = sum(p["samples"] * p["train_gflops_per_sample"] * 1e9 for p in plan["phases"]) / (256 * 989e12 * 0.4)
    assert plan["hours"] == pytest.approx(seconds / 3600)
    assert plan["gpu_hours"] == pytest.approx(plan["hours"] * 256)


def test_plan_table_says_what_does_not_fit_and_what_would():
    recipe = str(REPO / "configs" / "flip_h14_laion2b_25.6b.yaml")
    status, table, _ = run_cli("plan", recipe, "--gpus", "64", "--gpu-mem", "40")
    assert status == 0
    assert "fits in 40 GiB: NO" in table and "largest micro batch that fits: 64 (accum 16)" in table
    for row in ("parameters", "gradients", "optimizer states", "activations, checkpointing on",
                "activations, checkpointing off *", "contrastive logits (1024 x 65536 fp32)", "train GFLOPs per sample",
                "GPU-hours"):
        assert row in table
    status, table, _ = run_cli("plan", recipe, "model.activation_checkpointing=true", "--gpus", "64", "--gpu-mem", "40")
    assert "fits in 40 GiB: yes" in table and "activations, checkpointing on *" in table
    status, _, err = run_cli("plan", recipe, "--gpus", "48", "--gpu-mem", "80")
    assert status == 2 and err.strip() == ("flip-ds: error: train.global_batch: 65536 does not split over 48 GPUs; "
                                           "choose a multiple of 48")


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=[p.stem for p in PAPER_RECIPES])
def test_paper_recipe_has_flips_schedule_dry_runs_on_512_and_fits_64_h100(path):
    header = path.read_text().split("\noutput_dir:")[0]
    assert "Reproduces: Li et al., \"Scaling Language-Image Pre-training via Masking\"" in header
    assert "% zero-shot ImageNet-1k top-1" in header
    r = load_recipe(str(path))
    laion2b, huge = "laion2b" in path.stem, r.model.name == "H/14"
    assert r.train.global_batch == 65536 and r.train.precision == "auto"  # bf16 on every GPU planned for
    assert (r.optim.base_lr, r.optim.betas, r.optim.weight_decay) == (2e-6 if laion2b else 4e-6, (0.9, 0.95), 0.2)
    masked, tuning = r.phases
    epochs = 20_000 if "25.6b" in path.stem else 10_000
    assert (masked.mask_ratio, masked.samples, masked.warmup_samples) == (
        0.5, epochs * IMAGENET_EPOCH, (200 if huge else 40) * IMAGENET_EPOCH)
    assert (tuning.mask_ratio, tuning.base_lr, tuning.reset_optimizer) == (0.0, 4e-8, True)
    assert 120e6 <= tuning.samples <= 130e6 and tuning.warmup_samples == 20 * IMAGENET_EPOCH
    for world in (64, 256, 512):
        status, out, err = run_cli("train", "--config", str(path), "--dry-run", "--world-size", str(world))
        assert status == 0, err
    status, out, _ = run_cli("plan", str(path), "--gpus", "64", "--gpu-mem", "80", "--json")
    assert status == 0 and json.loads(out)["fits"]


def test_tiny_recipe_dry_runs():
    status, out, err = run_cli("train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run",
                               "--world-size", "2")
    assert status == 0, err
    assert "world size 2" in out
