"""The planner against DeepSpeed's own estimators and against activations measured on this machine;
its CLI, alone and comparing recipes side by side (the paper recipes themselves: test_recipes.py)."""

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
from flip_ds.config import load_recipe
from flip_ds.config_loader import ConfigError
from flip_ds.cost import MFU_HIGH, MFU_LOW, Setting, step_bytes_sent
from flip_ds.loss import contrastive_loss
from flip_ds.memory import saved_activation_bytes
from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import FLIP
from flip_ds.models.flops import flops_per_sample
from flip_ds.plan import Cluster, ZeroSetup, activations, model_states, parameter_counts, plan

REPO = Path(__file__).resolve().parent.parent
H14_ZERO3 = str(REPO / "configs" / "flip_h14_laion2b_25.6b.yaml")  # ZeRO-3, activation checkpointing
H14_ZERO2 = str(REPO / "configs" / "flip_h14_laion2b_25.6b_zero2.yaml")  # ZeRO-2, no checkpointing


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
    status, out, _ = run_cli("plan", H14_ZERO3, "--gpus", "256", "--gpu-mem", "80", "--json")
    assert status == 0
    plan = json.loads(out)
    assert plan["fits"] and plan["accum_steps"] == 65536 // (256 * 128) and plan["zero"]["stage"] == 3
    assert plan["checkpointing"]
    assert plan["max_micro_batch"] >= plan["micro_batch"] and plan["max_micro_accum"] * plan["max_micro_batch"] == 256
    masked, tuning = plan["phases"]
    assert (masked["samples"], tuning["samples"]) == (380_000 * 65536, 1_900 * 65536)  # FLIP's steps
    # the unmasked phase runs twice the image tokens: more FLOPs and more activation memory per sample
    assert tuning["train_gflops_per_sample"] > 1.8 * masked["train_gflops_per_sample"]
    assert tuning["activations_no_checkpointing"]["image"] > 1.8 * masked["activations_no_checkpointing"]["image"]
    slow, fast = plan["hours"]
    assert fast < slow and plan["gpu_hours"] == pytest.approx([slow * 256, fast * 256])
    assert plan["setting"]["mfu"] == [MFU_LOW, MFU_HIGH]


def test_plan_of_a_shape_spelled_out_is_its_registry_sizes_plan_and_another_shape_is_not():
    b16 = str(REPO / "configs" / "flip_b16_laion400m.yaml")
    by_hand = ["model.name=b16-by-hand", "model.vision={patch_size: 16, width: 768, depth: 12, heads: 12}",
               "model.text={width: 512, depth: 12, heads: 8}", "model.embed_dim=512"]

    def plan_json(*overrides: str) -> dict:
        status, out, err = run_cli("plan", b16, *overrides, "--gpus", "64", "--gpu-mem", "80", "--json")
        assert status == 0, err
        return json.loads(out)

    named, spelled, deeper = plan_json(), plan_json(*by_hand), plan_json(*by_hand, "model.vision.depth=24")
    assert (named["model"], spelled["model"]) == ("B/16", "b16-by-hand")
    assert {**spelled, "model": "B/16"} == named
    assert deeper["params"] - named["params"] == 12 * (12 * 768**2 + 13 * 768)  # 12 more 768-wide blocks
    assert deeper["phases"][0]["train_gflops_per_sample"] > named["phases"][0]["train_gflops_per_sample"]


def test_plan_splits_the_batch_as_the_trainer_does_with_the_recipes_own_accumulation():
    recipe = load_recipe(H14_ZERO2, ["train.accum_steps=4"])
    on_128 = plan(recipe, Cluster(gpus=128, gpu_mem_gib=80), Setting(), 32000)
    assert (on_128.micro_batch, on_128.accum_steps, on_128.split_error) == (128, 4, "")
    # on 256 GPUs a derived accumulation would be 2, but the recipe says 4: the trainer refuses, so it does not fit
    on_256 = plan(recipe, Cluster(gpus=256, gpu_mem_gib=80), Setting(), 32000)
    with pytest.raises(ConfigError) as refused:
        recipe.validate_world(256)
    assert on_256.accum_steps is None and not on_256.fits and on_256.split_error == str(refused.value)
    status, table, _ = run_cli("plan", H14_ZERO2, "train.accum_steps=4", "--gpus", "256", "--gpu-mem", "80")
    assert status == 0 and f"x accum ? x 256 GPUs  ({refused.value})" in table
    # a phase's own micro batch gets its own accumulation: the masked phase reduces gradients twice as often
    recipe = load_recipe(H14_ZERO2, ["phases.0.micro_batch=64"])
    per_phase = plan(recipe, Cluster(gpus=128, gpu_mem_gib=80), Setting(), 32000)
    assert (per_phase.micro_batch, per_phase.accum_steps) == (64, 8)
    masked, tuning = (ph.bytes_sent["gradient reduce-scatter"] for ph in per_phase.clock.phases)
    assert masked == pytest.approx(2 * tuning)


def test_the_published_runs_behind_the_default_mfu_range():
    # OpenCLIP ViT-H/14: 34,600 samples/s on 824 A100s (312 TFLOP/s), 3 x 381.7 GFLOPs per pair
    assert MFU_LOW == pytest.approx(34_600 * 3 * 381.7e9 / (824 * 312e12), abs=1e-3) == pytest.approx(0.154, abs=1e-3)
    assert 0.15 < MFU_HIGH < 0.25 and MFU_LOW < MFU_HIGH  # NeMo's ViT-g/14 at 117 samples/s per H100


@pytest.mark.parametrize("stage, accum, expected", [
    # weights 1000 params x 2 bytes x 3/4 (ring over 4 GPUs) = 1500; embeddings 2 towers x 64 x 8 x 2 x 3/4 = 1536
    (1, 2, {"gradient reduce-scatter": 1500, "weight all-gather": 1500, "embedding all-gather": 3 * 1536,
            "embedding-gradient all-reduce": 4 * 1536}),
    (2, 2, {"gradient reduce-scatter": 3000, "weight all-gather": 1500, "embedding all-gather": 3 * 1536,
            "embedding-gradient all-reduce": 4 * 1536}),
    # ZeRO-3 gathers the weights for 4 forwards (no-grad + with grad, 2 micro batches) and 2 backwards
    (3, 2, {"gradient reduce-scatter": 3000, "weight all-gather": 6 * 1500, "embedding all-gather": 3 * 1536,
            "embedding-gradient all-reduce": 4 * 1536}),
    (3, 1, {"gradient reduce-scatter": 1500, "weight all-gather": 2 * 1500, "embedding all-gather": 1536,
            "embedding-gradient all-reduce": 2 * 1536}),
])
def test_bytes_each_gpu_sends_per_step_match_a_hand_count(stage, accum, expected):
    sent = step_bytes_sent(params=1000, zero_stage=stage, accum=accum, global_batch=64, embed_dim=8, world=4,
                           act_bytes=2)
    assert sent == pytest.approx(expected)


@pytest.mark.parametrize("gpus, accum", [(256, 2), (512, 1)])
def test_compute_counts_the_feature_cache_forward_only_with_accumulation(gpus, accum):
    recipe = H14_ZERO2  # no activation checkpointing: no recomputing forward on top
    status, out, _ = run_cli("plan", recipe, "--gpus", str(gpus), "--gpu-mem", "80", "--json")
    assert status == 0
    plan = json.loads(out)
    masked = plan["clock"]["phases"][0]
    forward = flops_per_sample(load_recipe(recipe).model, 0.5).forward
    forwards = 3 + (1 if accum > 1 else 0)  # forward + backward (2x), plus the no-grad pass of the feature cache
    work = 65536 / gpus * forwards * forward
    assert masked["compute_s"] == pytest.approx([work / (989e12 * MFU_LOW), work / (989e12 * MFU_HIGH)])
    assert masked["communication_s"] == pytest.approx(sum(masked["bytes_sent"].values()) / 40e9)  # across nodes
    slow_steps = masked["steps"] * (masked["compute_s"][0] + masked["communication_s"]) / 3600
    tuning = plan["clock"]["phases"][1]
    slow_steps += tuning["steps"] * (tuning["compute_s"][0] + tuning["communication_s"]) / 3600
    overheads = plan["clock"]["overheads"][0]
    assert plan["hours"][0] == pytest.approx(slow_steps + overheads["eval_hours"] + overheads["checkpoint_hours"]
                                             + overheads["restart_hours"])
    assert overheads["time_limit_restarts"] == math.ceil(slow_steps / 24) - 1


def test_plan_table_says_what_does_not_fit_and_what_would():
    recipe = H14_ZERO2
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


def test_plan_compares_recipes_side_by_side_for_each_gpu_count():
    status, table, _ = run_cli("plan", H14_ZERO3, H14_ZERO2, "--gpus", "64", "512", "--gpu-mem", "79.6")
    assert status == 0
    blocks = table.split("\n\n")
    assert blocks[0].startswith("64 GPUs x 79.6 GiB (8 node(s) of 8)")
    assert blocks[1].startswith("512 GPUs x 79.6 GiB (64 node(s) of 8)")
    header = blocks[0].splitlines()[1].split()
    assert header == ["flip_h14_laion2b_25.6b", "flip_h14_laion2b_25.6b_zero2"]
    rows = {line[:44].strip(): line[44:].split() for line in blocks[0].splitlines()[2:]}
    assert rows["ZeRO stage, activation checkpointing"] == ["3,", "on", "2,", "off"]
    assert rows["masked: steps"] == ["380,000", "380,000"]
    # each column is that recipe's own plan
    for path, column in ((H14_ZERO3, 0), (H14_ZERO2, 1)):
        _, out, _ = run_cli("plan", path, "--gpus", "64", "--gpu-mem", "79.6", "--json")
        alone = json.loads(out)
        assert rows["peak per GPU (GiB)"][column] == f"{alone['peak_gib']:.2f}"
        days = f"{alone['days'][1]:,.1f}-{alone['days'][0]:,.1f}"
        assert rows["wall-clock (days)"][column] == days
    status, out, _ = run_cli("plan", H14_ZERO3, H14_ZERO2, "model.activation_checkpointing=true", "--gpus", "64",
                             "256", "--gpu-mem", "40", "--json")
    plans = json.loads(out)
    assert status == 0 and [(p["recipe"], p["cluster"]["gpus"]) for p in plans] == [
        (H14_ZERO3, 64), (H14_ZERO2, 64), (H14_ZERO3, 256), (H14_ZERO2, 256)]
    assert all(p["checkpointing"] and p["fits"] for p in plans)  # the override applies to every recipe
    status, _, err = run_cli("plan", "train.micro_batch=64", "--gpus", "64", "--gpu-mem", "80")
    assert status == 2
    assert err.strip() == "flip-ds: error: plan: name at least one recipe before the KEY=VALUE overrides"


def test_tiny_recipe_dry_runs():
    status, out, err = run_cli("train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run",
                               "--world-size", "2")
    assert status == 0, err
    assert "world size 2" in out
