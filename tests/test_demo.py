"""The README's demo pipeline end to end at reduced size, through the deepspeed launcher: every
artefact a newcomer is promised is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.distributed_helpers import REPO, scalars


def test_demo_pipeline_produces_every_artefact(tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    recipe["phases"][0].update(samples=2560, warmup_samples=256)  # 40 steps of 64, then 4 unmasked
    recipe["phases"][1].update(samples=256, warmup_samples=0)
    recipe["checkpoint"]["every_samples"] = 0
    recipe["logging"]["every_steps"] = 4
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(recipe))
    data, out = tmp_path / "data", tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "flip_ds", "demo", "--config", str(tmp_path / "demo.yaml"),
                           "--data", str(data), "--out", str(out), "--train-samples", "1024"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = done.stdout[done.stdout.index("flip-ds demo: what it achieved"):]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / tag / "meta.json").read_text())
    assert meta["precision"] in ("bf16", "fp32") and meta["precision_reason"].startswith("auto: ")
    # on a CPU: single-threaded ranks, one per core as far as the batch of 64 splits (2 on a 2-core
    # machine), and ZeRO stage auto's choice for a model that fits with room to spare, ZeRO-1
    ranks = max(n for n in range(1, (os.cpu_count() or 1) + 1) if 64 % n == 0)
    assert (meta["world_size"], meta["zero_stage"]) == (ranks, 1)
    assert "ZeRO stage 1 (auto on cpu, " in done.stdout  # the trainer's start-up line, with its reason
    for line in (f"on {ranks} x cpu (ZeRO-1, {meta['precision']}) in", f"layout         {ranks} process(es) x ",
                 f"precision      {meta['precision']}: auto", "samples/s at mask 0.5", "masking",
                 "zero-shot      top-1", "image->text R@1", "TensorBoard", "exported"):
        assert line in summary, summary
    # the dataset and tokenizer
    assert sorted(p.name for p in (data / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]  # 1024 in 1000s
    assert (data / "tokenizer.model").is_file()
    # the DeepSpeed checkpoint, complete: ZeRO-1's one model file and every rank's optimizer shard
    assert (out / "checkpoints" / tag / "mp_rank_00_model_states.pt").is_file()
    assert len(list((out / "checkpoints" / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == ranks
    # TensorBoard events with the expected tags, both phases, and the in-training eval
    tb = out / "tensorboard"
    assert set(scalars(tb, "train/mask_ratio").values()) == {0.5, 0.0}
    for tag_name in ("train/loss", "perf/samples_per_s", "perf/tflops_per_device", "data/samples_read",
                     "eval/demo_zeroshot/top1", "eval/demo_retrieval/i2t_r1"):
        assert scalars(tb, tag_name), tag_name
    # eval results of the exported model: zero-shot above chance on 16 held-out classes (400 images:
    # chance is 6.25% +- 1.2%, so 10% is three standard deviations above it)
    zero_shot = json.loads((out / "eval_zero_shot.json").read_text())
    assert zero_shot["metrics"]["top1"] > 0.10, zero_shot["metrics"]
    # retrieval above chance both ways on 200 images with 3 captions each: a random ranking puts a
    # match in the top 10 for 5% +- 1.5% of the queries, so 10% is three standard deviations above
    # it (measured: 23%)
    retrieval = json.loads((out / "eval_retrieval.json").read_text())
    assert (retrieval["data"]["images"], retrieval["data"]["captions"]) == (200, 600)
    assert min(retrieval["metrics"]["i2t_r10"], retrieval["metrics"]["t2i_r10"]) > 0.10, retrieval["metrics"]
    # the exported file loads without DeepSpeed
    code = ("import sys, flip_ds; model, tok, recipe = flip_ds.load(sys.argv[1]); "
            "assert 'deepspeed' not in sys.modules; print(recipe.model.name, tok.vocab_size)")
    loaded = subprocess.run([sys.executable, "-c", code, str(out / "model.safetensors")], capture_output=True,
                            text=True, cwd=REPO)
    assert loaded.returncode == 0 and loaded.stdout.startswith("tiny"), loaded.stderr
    assert (out / "vision_timm.safetensors").is_file()
