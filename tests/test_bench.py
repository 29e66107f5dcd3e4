"""The benchmark's machinery at smoke size: its arithmetic, OpenCLIP's twin of our model, and the
JSON of one real two-rank run. Timings are asserted only within bands an order of magnitude wide,
against a matmul timed here: enough to catch a wrong unit, never a slow machine."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flip_ds.bench.cases import interleave
from flip_ds.bench.random_batch import random_batch
from flip_ds.bench.table import Row, fill_mask_ratios, fill_throughput, largest_batch, peer_summary, train_flops_ratio
from flip_ds.cli import main
from flip_ds.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from flip_ds.models.config import ModelConfig, TowerSizes
from flip_ds.models.flip import FLIP
from flip_ds.models.flops import flops_per_sample
from flip_ds.plan import parameter_counts
from flip_ds.precision import dtype_of
from tests.distributed_helpers import REPO, torchrun

B16 = ModelConfig(name="B/16")
SMOKE_PARAMS = parameter_counts(ModelConfig(name="tiny"), 1000)[0]  # --smoke: the tiny model, vocabulary 1000
# a shape of one's own whose towers' MLP ratios differ (2.5 and 3)
ODD = ModelConfig.of_shape("odd", TowerSizes(48, 8, 64, 2, 4, 32, 2, 4, 48, vision_mlp_ratio=2.5, text_mlp_ratio=3.0))


def matmul_tflops(precision: str, threads: int) -> float:
    """This process's best rate for a 1024^2 product in `precision` on `threads` threads: the
    reference the bench's own matmul peak is checked against (best of 5, so a busy moment here
    does not lower it)."""
    a = torch.randn(1024, 1024).to(dtype_of(precision))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, a)
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, a)
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * 1024**3 / min(seconds) / 1e12


def assert_smoke_result_is_plausible(result: dict, precision: str) -> None:
    """What a --smoke run reports when the bench measures right, far from a unit slip (1000x) or a
    lost dimension (2048x). On a CPU (the tiny model, batch 4): the matmul peak, each rank's square
    product with the ranks at once, measured at 0.7x this process's own rate on as many threads;
    MFU measured 0.7-16% (a GPU only bounds it by 1); the optimizer 6-35% of the step. Anywhere:
    held memory is at least Adam's two fp32 moments of the rank's share of the parameters, which
    ZeRO keeps between steps (measured 0.013-0.12 GiB), and well below a GiB."""
    machine = result["machine"]
    on_cpu = machine["accelerator"] == "cpu"
    if on_cpu:
        peak = result["peak_tflops_per_rank"][precision]
        reference = matmul_tflops(precision, machine["threads_per_rank"])
        assert reference / 8 < peak < reference * 4, (peak, reference)
    lowest_mfu, highest_mfu = (0.001, 0.6) if on_cpu else (0.0, 1.0)
    moments_gib = 8 * SMOKE_PARAMS / machine["ranks"] / 2**30
    for row in result["rows"]:
        assert lowest_mfu < row["mfu"] < highest_mfu, row
        if row["stack"] == "flip-ds":
            assert moments_gib < row["held_gb"] <= row["peak_gb"] < 1.0, row
            assert not on_cpu or 0.005 < row["optimizer_share"] < 0.9, row


def test_throughput_tflops_and_mfu_follow_from_the_step_time():
    row = Row("flip-ds", "zero1 bf16", "bf16", 0.5, batch_per_rank=8, ranks=2, step_s=4.0)
    fill_throughput(row, B16, peak_tflops=0.8)
    assert row.samples_per_s == 4.0  # 8 per rank x 2 ranks every 4 s
    assert row.tflops == pytest.approx(flops_per_sample(B16, 0.5).train * 4.0 / 1e12)
    assert row.mfu == pytest.approx(row.tflops / 0.8)


def test_flops_ratio_keeps_image_tokens_and_the_whole_text():
    # B/16 at 224 px with 32 text tokens: 98 (49) of 196 patches kept, text unchanged
    assert train_flops_ratio(B16, 0.0) == 1.0
    assert train_flops_ratio(B16, 0.5) == pytest.approx(0.5284, abs=1e-4)
    assert train_flops_ratio(B16, 0.75) == pytest.approx(0.2997, abs=1e-4)


def test_mask_ratios_compare_each_setup_with_its_own_unmasked_step():
    rows = [Row("flip-ds", "zero1 bf16", "bf16", 0.0, 8, 2, 4.0), Row("flip-ds", "zero1 bf16", "bf16", 0.5, 8, 2, 2.4),
            Row("flip-ds", "zero1 fp32", "fp32", 0.0, 8, 2, 8.0), Row("flip-ds", "zero1 fp32", "fp32", 0.5, 8, 2, 4.0),
            Row("open_clip", "fp32", "fp32", 0.5, 8, 1, 3.0)]
    fill_mask_ratios(rows, B16)
    assert [r.ratio_to_mask0 for r in rows] == [1.0, pytest.approx(0.6), 1.0, 0.5, None]
    assert rows[1].flops_ratio == train_flops_ratio(B16, 0.5)
    assert rows[1].ratio_over_flops == pytest.approx(0.6 / train_flops_ratio(B16, 0.5))
    assert rows[4].ratio_over_flops is None  # OpenCLIP was not timed unmasked here


def test_peer_summary_pits_the_fastest_setup_of_each_stack_per_mask():
    rows = []
    for stack, setup, ranks, step_s in [("flip-ds", "zero1 bf16", 2, 4.0), ("flip-ds", "zero1 fp32", 2, 8.0),
                                        ("open_clip", "amp_bf16", 1, 2.0), ("open_clip", "fp32", 1, 3.0)]:
        row = Row(stack, setup, setup[-4:], 0.0, 8, ranks, step_s)
        fill_throughput(row, B16, 1.0)
        rows.append(row)
    (entry,) = peer_summary(rows)
    assert (entry["flip_ds"], entry["open_clip"]) == ("zero1 bf16", "amp_bf16")
    assert entry["speedup"] == pytest.approx((16 / 4.0) / (8 / 2.0))


@pytest.mark.parametrize("bytes_at", [lambda b: 1000 + 96 * b,  # affine, as activations are
                                      lambda b: 4096 * math.ceil((300 + 96 * b) / 4096)])  # page-rounded
def test_largest_batch_is_the_exact_boundary(bytes_at):
    budget = bytes_at(8) + 500
    calls = []

    def measure(b: int) -> int:
        calls.append(b)
        return bytes_at(b)

    found = largest_batch(measure, budget, start=4)
    assert bytes_at(found) <= budget < bytes_at(found + 1)
    assert largest_batch(bytes_at, bytes_at(1) - 1, start=4) == 0  # not even one sample fits
    assert len(set(calls)) <= 10  # predicted from two points, then confirmed or bisected; no linear scan


def test_random_captions_are_laid_out_like_the_tokenizer_writes_them():
    images, tokens = random_batch(16, 32, 12, 100, seed=3, device="cpu", dtype=torch.bfloat16)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.bfloat16
    assert (tokens[:, 0] == BOS_ID).all()
    for row in tokens.tolist():
        eos = row.index(EOS_ID)
        assert all(4 <= t < 100 for t in row[1:eos]) and eos >= 2
        assert all(t == PAD_ID for t in row[eos + 1:])
    again = random_batch(16, 32, 12, 100, seed=3, device="cpu", dtype=torch.bfloat16)
    assert torch.equal(tokens, again[1]) and torch.equal(images, again[0])


def test_openclip_twin_of_b16_is_its_builtin_vit_b16():
    open_clip = pytest.importorskip("open_clip")
    from flip_ds.bench.openclip_peer import openclip_model_config

    ours = openclip_model_config(B16, vocab_size=49408, patch_dropout=0.5)
    builtin = open_clip.get_model_config("ViT-B-16")
    assert ours["embed_dim"] == builtin["embed_dim"]
    for key in ("image_size", "layers", "width", "patch_size"):
        assert ours["vision_cfg"][key] == builtin["vision_cfg"][key]
    assert ours["vision_cfg"]["head_width"] == builtin["vision_cfg"].get("head_width", 64)
    for key in ("vocab_size", "width", "heads", "layers"):
        assert ours["text_cfg"][key] == builtin["text_cfg"][key]
    assert ours["text_cfg"]["context_length"] == 32  # FLIP's, forced as --force-context-length would


@pytest.mark.parametrize("mask", [0.0, 0.5])
@pytest.mark.parametrize("cfg", [ModelConfig(name="tiny"), ODD], ids=["tiny", "odd"])
def test_openclip_twin_does_the_same_model_flops(mask, cfg):
    open_clip = pytest.importorskip("open_clip")
    from flip_ds.bench.openclip_peer import openclip_model_config

    torch.manual_seed(0)
    ours = FLIP(cfg, vocab_size=1000).train()
    theirs = open_clip.model.CLIP(**openclip_model_config(cfg, 1000, patch_dropout=0.5), output_dict=True).train()
    theirs.visual.patch_dropout.prob = mask
    images, tokens = random_batch(2, cfg.resolved_image_size, cfg.context_length, 1000, seed=0, device="cpu",
                                  dtype=torch.float32)
    with FlopCounterMode(display=False) as counted_ours:
        ours(images, tokens, mask)
    with FlopCounterMode(display=False) as counted_theirs:
        theirs(images, tokens)
    assert counted_ours.get_total_flops() == counted_theirs.get_total_flops()
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_theirs == pytest.approx(n_ours, rel=1e-3)  # OpenCLIP adds a pre-LayerNorm


@pytest.mark.parametrize("args, cause", [(["--zero", "4"], "--zero"), (["--masks", "0.5", "--max-batch"], "mask 0"),
                                         (["--model", "B/33"], "--model")])
def test_bad_arguments_fail_in_one_line_before_any_work(args, cause, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and cause in err


def test_a_recipes_model_of_any_shape_is_benchmarked_and_a_bad_one_fails_in_one_line(tmp_path, capsys):
    from flip_ds.bench.runner import BenchSpec
    from flip_ds.models.config import model_section

    recipe = tmp_path / "odd.yaml"
    recipe.write_text("model:\n  name: odd\n  image_size: 48\n"
                      "  vision: {patch_size: 8, width: 64, depth: 2, heads: 4, mlp_ratio: 2.5}\n"
                      "  text: {width: 32, depth: 2, heads: 4, mlp_ratio: 3.0}\n  embed_dim: 48\n")
    spec = BenchSpec(model="odd", shape=model_section(str(recipe)), context_length=16)
    spec.validate()
    assert spec.model_config.sizes == ODD.sizes and spec.model_config.context_length == 16
    recipe.write_text(recipe.read_text().replace("heads: 4, mlp", "heads: 5, mlp"))
    assert main(["bench", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.vision.heads: width 64 does not split into 5 heads" in err, err


def test_two_rank_smoke_run_reports_every_setup_consistently(tmp_path):
    pytest.importorskip("open_clip")
    out = tmp_path / "bench.json"
    run = torchrun(["bench", "--smoke", "--zero", "1", "3", "--attention", "auto", "sdpa", "--masks", "0", "0.5",
                    "--peer", "--max-batch", "--json", str(out)], nproc=2, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples/s" in run.stdout and "largest batch" in run.stdout
    result = json.loads(out.read_text())
    tiny = ModelConfig(name="tiny")
    assert result["machine"]["ranks"] == 2 and result["spec"]["model"] == "tiny"
    [precision] = result["spec"]["precisions"]  # 'auto', resolved for this CPU
    assert precision in ("bf16", "fp32") and result["spec"]["peer_precisions"] is None
    assert_smoke_result_is_plausible(result, precision)
    peak = result["peak_tflops_per_rank"][precision]
    rows = result["rows"]
    flip = {(r["setup"], r["mask"]): r for r in rows if r["stack"] == "flip-ds"}
    setups = [f"zero{s} {precision}{path}" for s in (1, 3) for path in ("", " sdpa")]  # auto, then SDPA forced
    assert set(flip) == {(setup, m) for setup in setups for m in (0.0, 0.5)}
    theirs = {r["mask"]: r for r in rows if r["stack"] == "open_clip"}
    peer_setup = {"bf16": "amp_bf16", "fp32": "fp32"}[precision]
    assert set(theirs) == {0.0, 0.5} and all(r["ranks"] == 1 and r["setup"] == peer_setup for r in theirs.values())
    for r in rows:
        assert r["step_s"] == statistics.median(r["step_s_samples"])
        assert r["samples_per_s"] == pytest.approx(4 * r["ranks"] / r["step_s"])
        assert r["tflops"] == pytest.approx(flops_per_sample(tiny, r["mask"]).train * r["samples_per_s"] / 1e12)
        assert r["ratio_to_mask0"] == pytest.approx(r["step_s"] / next(
            o["step_s"] for o in rows if o["stack"] == r["stack"] and o["setup"] == r["setup"] and o["mask"] == 0))
    for r in flip.values():
        assert r["mfu"] == pytest.approx(r["tflops"] / (2 * peak))
    # OpenCLIP is one process with the whole node: its MFU is against both ranks' peak too
    assert theirs[0.0]["mfu"] == pytest.approx(theirs[0.0]["tflops"] / (2 * peak))
    assert [p["mask"] for p in result["peer"]] == [0.0, 0.5]
    assert all(p["speedup"] == pytest.approx(p["flip_ds_samples_per_s"] / p["open_clip_samples_per_s"])
               for p in result["peer"])
    text = {r["text_mask"]: r for r in result["text_tower"]}  # the text tower alone, tokens dropped
    assert set(text) == {0.0, 0.5} and (text[0.0]["tokens"], text[0.5]["tokens"]) == (32, 16)
    assert text[0.5]["vs_text_mask0"] == pytest.approx(text[0.5]["ms"] / text[0.0]["ms"])
    unmasked, masked = result["max_batch"]
    assert unmasked["batch"] == 4  # the budget is what mask 0 needs at the run's batch
    assert masked["batch"] > unmasked["batch"] and masked["activation_gb"] <= masked["budget_gb"]


def test_gpu_bench_script_runs_its_smoke_mode_on_a_cpu(tmp_path):
    """tools/gpu_bench.sh, the one prepared GPU command, has its whole path exercised here: argument
    parsing, the environment it sets up, and a bench per model written to --out."""
    run = subprocess.run(["tools/gpu_bench.sh", "--smoke", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0 and "FAILED" not in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows, [precision] = result["rows"], result["spec"]["precisions"]
    assert {(r["setup"], r["mask"]) for r in rows} == {(f"zero{s} {precision}", m) for s in (1, 3)
                                                       for m in (0.0, 0.5, 0.75)}
    assert_smoke_result_is_plausible(result, precision)
    table = [line for line in (tmp_path / "smoke.log").read_text().splitlines() if line.startswith("flip-ds ")]
    assert len(table) == len(rows) == 6  # the log holds the table: a line per setup and mask


class _CountingCase:
    name = "counting"

    def __init__(self) -> None:
        self.blocks: list[int] = []

    def run_block(self, steps: int) -> float:
        self.blocks.append(steps)
        return float(steps)


@pytest.mark.parametrize("warmup", [0, 2])
def test_interleave_runs_the_warmup_then_one_block_a_round(warmup):
    case = _CountingCase()
    assert interleave([case], rounds=3, steps=4, warmup=warmup) == {"counting": [4.0, 4.0, 4.0]}
    assert case.blocks == [warmup] * bool(warmup) + [4, 4, 4]
