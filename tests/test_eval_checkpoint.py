"""Evaluation and export of a real DeepSpeed ZeRO-3 checkpoint written by 2 ranks.

One module-scoped run trains a tiny FLIP for a few steps under ZeRO-3 (fp32, parameters really
partitioned), evaluates it there with the in-training runner, and saves the checkpoint in the
flip-ds layout. The tests then check that the same numbers come back from the unpartitioned
model, from 1 process and 2 (torchrun), from the checkpoint directory and from the exported file,
and that the timm export matches the tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from flip_ds import checkpoint, load
from flip_ds.cli import main
from flip_ds.config import load_recipe
from flip_ds.config_loader import ConfigError, UsageError
from flip_ds.data.tokenizer import Tokenizer, train_tokenizer
from flip_ds.evaluation.datasets import read_image_folder
from flip_ds.evaluation.runner import evaluate
from flip_ds.evaluation.zero_shot import class_embeddings, evaluate_zero_shot
from tests.distributed_helpers import run_on_ranks, torchrun

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "purple": (150, 40, 160)}
TEMPLATES = ["a photo of a {} square.", "a {} thing."]
RETRIEVAL = [(f"r{i}.png", color, [f"a {color} square number {i}", f"something {color}"])
             for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "red", "blue"])]
IMAGE = 32


def _write_image(path: Path, rgb: tuple[int, int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-40, 40, (40, 44, 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path)


def _make_data(root: Path) -> None:
    for c, (name, rgb) in enumerate(COLORS.items()):
        for i in range(3):
            _write_image(root / "zs" / f"{c}_{name}" / f"{i}.png", rgb, seed=10 * c + i)
    (root / "zs" / "2_blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    lines = []
    for i, (name, color, caps) in enumerate(RETRIEVAL):
        _write_image(root / "rt" / name, COLORS[color], seed=100 + i)
        lines.append(json.dumps({"image": f"rt/{name}", "captions": caps}))
    lines.append(json.dumps({"image": "rt/missing.png", "captions": ["an image that is not there", "nothing"]}))
    (root / "retrieval.jsonl").write_text("\n".join(lines) + "\n")


def _train_eval_save(rank: int, world: int, recipe_path: str, out: str) -> None:
    """On each rank: a few ZeRO-3 steps, the in-training eval, then a flip-ds checkpoint."""
    import deepspeed

    from flip_ds.loss import contrastive_loss
    from flip_ds.models.flip import build_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no minute-long g++ build on CPU
    recipe = load_recipe(recipe_path)
    tok = Tokenizer(recipe.data.tokenizer, recipe.model.context_length)
    torch.manual_seed(0)
    model = build_model(recipe.model, tok.vocab_size)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * world,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "memory_efficient_linear": False},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    captions = [c for _, _, caps in RETRIEVAL for c in caps]
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        pick = torch.randint(0, len(captions), (4,), generator=g).tolist()
        tokens = torch.from_numpy(tok([captions[i] for i in pick]))
        image_emb, text_emb, scale = engine(torch.randn(4, 3, IMAGE, IMAGE, generator=g), tokens, 0.5, 0.0, g)
        engine.backward(contrastive_loss(image_emb, text_emb, scale))
        engine.step()
    assert engine.module.visual_proj.weight.numel() == 0, "ZeRO-3 should hold only a partition outside forward"
    results = evaluate(engine.module, recipe.eval.sets, tok, IMAGE, "cpu", torch.float32)
    class_emb = class_embeddings(engine.module, tok, list(COLORS), TEMPLATES, 3, torch.device("cpu"), torch.float32,
                                 progress=False)
    if rank == 0:
        Path(out, "zero3_results.json").write_text(json.dumps(results))
        torch.save(class_emb, Path(out, "zero3_class_emb.pt"))
    checkpoint.save(engine, Path(recipe.output_dir) / "checkpoints", 3, {"flip_ds": {}}, recipe,
                    recipe.data.tokenizer, {"samples_seen": 24, "step": 3, "phase": "p", "world_size": world}, rank)
    engine.destroy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    _make_data(root / "data")
    prompts = [t.replace("{}", c) for c in COLORS for t in TEMPLATES]
    spm = train_tokenizer(prompts + [c for _, _, caps in RETRIEVAL for c in caps] * 3, str(root / "spm"),
                          vocab_size=48)
    d = root / "data"
    recipe = f"""
output_dir: {root / "run"}
model: {{name: tiny, image_size: {IMAGE}, context_length: 16, activation_checkpointing: false}}
data: {{tokenizer: {spm}}}
train: {{global_batch: 8, micro_batch: 4, precision: fp32}}
phases: [{{name: p, samples: 64}}]
eval:
  sets:
    - {{name: zs, kind: zero_shot, path: {d / "zs"}, classnames: {d / "classnames.txt"},
       templates: {d / "templates.txt"}, batch_size: 6, workers: 0}}
    - {{name: rt, kind: retrieval, path: {d / "retrieval.jsonl"}, batch_size: 6, workers: 0}}
"""
    (root / "recipe.yaml").write_text(recipe)
    run_on_ranks(_train_eval_save, 2, str(root / "recipe.yaml"), str(root))
    return root


def _zero_shot_args(root: Path, checkpoint: Path | str, json_out: Path) -> list[str]:
    d = root / "data"
    return ["eval", "zero-shot", str(checkpoint), "--data", str(d / "zs"), "--classnames", str(d / "classnames.txt"),
            "--templates", str(d / "templates.txt"), "--batch-size", "6", "--json", str(json_out), "--no-progress"]


def test_in_training_eval_under_zero3_matches_the_unpartitioned_model(trained):
    model, tok, recipe = load(trained / "run")
    assert not any(p.numel() == 0 for p in model.parameters())
    results = evaluate(model, recipe.eval.sets, tok, IMAGE, "cpu", torch.float32)
    zero3 = json.loads((trained / "zero3_results.json").read_text())
    assert results == zero3
    assert set(results["zs"]) == {"top1", "mean_per_class"} and set(results["rt"]) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    plain = class_embeddings(model, tok, list(COLORS), TEMPLATES, 3, torch.device("cpu"), torch.float32, False)
    torch.testing.assert_close(plain, torch.load(trained / "zero3_class_emb.pt"), atol=1e-5, rtol=0)


def test_resume_and_eval_find_the_same_checkpoint_from_each_path_a_user_may_give(trained, tmp_path):
    """Training's resume= and eval / export / init_from (read_checkpoint) take the same three paths to
    the same tag, and refuse a `latest` that names an incomplete tag with the same words."""
    run = trained / "run"
    tag_dir = run / "checkpoints" / "step_00000003"
    recipe = load_recipe(str(trained / "recipe.yaml"))
    fresh = tmp_path / "fresh" / "checkpoints"  # the resuming run's own, still empty
    for path in (run, run / "checkpoints", tag_dir):
        recipe.resume = str(path)
        assert checkpoint.find_resume(recipe, fresh) == (run / "checkpoints", tag_dir.name), path
        assert checkpoint.read_checkpoint(path).source == str(tag_dir), path
    recipe.resume = "auto"
    assert checkpoint.find_resume(recipe, run / "checkpoints") == (run / "checkpoints", tag_dir.name)
    broken = tmp_path / "broken" / "checkpoints"
    (broken / "step_00000009").mkdir(parents=True)  # a save killed before its meta.json
    (broken / "latest").write_text("step_00000009")
    for path in (broken.parent, broken):
        recipe.resume = str(path)
        with pytest.raises(UsageError, match="incomplete") as read_error:
            checkpoint.read_checkpoint(path)
        with pytest.raises(ConfigError) as resume_error:
            checkpoint.find_resume(recipe, fresh)
        assert str(resume_error.value) == f"resume: {read_error.value}"


def test_zero_shot_same_numbers_on_1_and_2_processes_from_dir_and_export(trained, capsys):
    exported = trained / "model.safetensors"
    assert main(["export", str(trained / "run" / "checkpoints"), "--out", str(exported)]) == 0
    assert "load with flip_ds.load(" in capsys.readouterr().out
    assert main(_zero_shot_args(trained, trained / "run", trained / "one.json") + ["--workers", "0"]) == 0
    assert capsys.readouterr().out.startswith("zero-shot top1 ")
    proc = torchrun(_zero_shot_args(trained, exported, trained / "two.json") + ["--workers", "1"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((trained / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metrics"] == two["metrics"]
    assert one["per_class"] == two["per_class"]
    assert one["data"] == two["data"] and one["data"]["images"] == 15 and one["data"]["skipped_images"] == 1
    assert one["step"] == 3 and one["samples_seen"] == 24 and one["model"] == "tiny"
    assert [p["name"] for p in one["per_class"]] == list(COLORS)
    assert set(one["timings"]) == {"load_s", "eval_s", "total_s"}


def test_retrieval_cli_agrees_with_the_runner(trained, capsys):
    tag_dir = trained / "run" / "checkpoints" / "step_00000003"
    out = trained / "retrieval.json"
    # fp32 as the fixture's run evaluated in training (auto would be bf16 on a CPU with native bf16)
    assert main(["eval", "retrieval", str(tag_dir), "--data", str(trained / "data" / "retrieval.jsonl"),
                 "--batch-size", "6", "--workers", "2", "--precision", "fp32", "--json", str(out),
                 "--no-progress"]) == 0
    assert "text->image R@1/5/10" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["metrics"] == json.loads((trained / "zero3_results.json").read_text())["rt"]
    assert (result["data"]["images"], result["data"]["captions"], result["data"]["skipped_images"]) == (7, 14, 1)


def test_masked_evaluation_is_seeded(trained):
    out = trained / "masked.json"
    # fp32 as the direct evaluation below (auto would be bf16 on a CPU with native bf16)
    assert main(_zero_shot_args(trained, trained / "run", out) + ["--workers", "0", "--mask-ratio", "0.5",
                                                                  "--precision", "fp32"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["mask_ratio"] == 0.5 and result["settings"]["seed"] == 0
    model, tok, _ = load(trained / "run")
    d = trained / "data"
    data = read_image_folder(str(d / "zs"))
    again = evaluate_zero_shot(model, tok, data, list(COLORS), TEMPLATES, image_size=IMAGE, batch_size=6, workers=0,
                               device=torch.device("cpu"), dtype=torch.float32, mask_ratio=0.5, seed=0,
                               progress=False)
    assert again.metrics == result["metrics"]  # same masks: batch b is masked with seed + b
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        a = model.encode_image(images, 0.5, torch.Generator().manual_seed(0))
        b = model.encode_image(images, 0.5, torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)  # the seed really changes the mask


def test_linear_probe_cli(trained, capsys):
    out = trained / "probe.json"
    zs = str(trained / "data" / "zs")
    assert main(["eval", "linear-probe", str(trained / "run"), "--train", zs, "--test", zs, "--batch-size", "6",
                 "--workers", "0", "--features", "tower", "--json", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("linear probe top1 ")
    result = json.loads(out.read_text())
    assert result["data"]["train_images"] == 15 and result["data"]["skipped_images"] == 2
    # colour squares are linearly separable in any sane feature space, and test == train here
    assert result["metrics"]["top1"] == 1.0
    assert len(result["sweep"]) == 13 + 6 and result["metrics"]["C"] in [s["C"] for s in result["sweep"]]


def test_timm_export_of_the_deepspeed_checkpoint(trained, capsys):
    out = trained / "vision.safetensors"
    assert main(["export", str(trained / "run"), "--timm-out", str(out)]) == 0
    printed = capsys.readouterr().out
    code = printed[printed.index("model = timm.create_model("):]
    scope: dict = {"timm": timm, "safetensors": safetensors}
    exec(code, scope)
    flip_model, _, _ = load(trained / "run" / "checkpoints")
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(images), flip_model.visual(images), atol=1e-5, rtol=0)
