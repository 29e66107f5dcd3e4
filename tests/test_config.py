"""Recipe errors: one line naming the key and the allowed values, exit status 2, before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flip_ds.cli import main
from flip_ds.config import load_recipe

RECIPE = "configs/tiny_cpu.yaml"
# a whole shape of one's own, for tiny_cpu's 64-px images
SHAPE = ["model.vision={patch_size: 8, width: 64, depth: 2, heads: 4}", "model.text={width: 32, depth: 2, heads: 4}",
         "model.embed_dim=48", "model.image_size=64"]

CASES = [
    (["model.nam=tiny"], "unknown key 'model.nam'; ModelConfig has: name,"),
    (["bogus.key=1"], "unknown key 'bogus'; Recipe has: output_dir,"),
    (["train.global_batch=lots"], "train.global_batch: expected an integer, got 'lots'"),
    (["train.precision=fp16"], "train.precision: 'fp16' is not allowed; choose one of 'auto', 'bf16', 'fp32'"),
    (["model.name=G/14"], "model.name: 'G/14' is not a model; choose one of tiny, S/16, B/32, B/16, L/16, L/14, "
                          "H/14, g/14, or give a shape of your own (model.vision, model.text, model.embed_dim)"),
    (["model.name=tiny", "model.vision.width=256"],
     "model.vision.width: 256 conflicts with tiny's 128; a shape of your own needs a name outside the registry"),
    (["model.name=mine", SHAPE[0], "model.text={width: 32, depth: 2}", SHAPE[2]],
     "model.text.heads: missing; 'mine' is not a registry size, so its shape needs every size"),
    (["model.name=mine", *SHAPE, "model.vision.heads=5"],
     "model.vision.heads: width 64 does not split into 5 heads (remainder 4)"),
    (["model.name=mine", *SHAPE, "model.text.heads=3"], "model.text.heads: width 32 does not split into 3 heads"),
    (["model.name=mine", *SHAPE, "model.vision.patch_size=12"],
     "model.image_size: 64 is not a positive multiple of the patch size 12"),
    (["model.name=mine", *SHAPE, "model.vision.depth=0"], "model.vision.depth: 0 must be > 0"),
    (["model.name=mine", *SHAPE, "model.text.width=-32"], "model.text.width: -32 must be > 0"),
    (["model.name=mine", *SHAPE, "model.embed_dim=0"], "model.embed_dim: 0 must be > 0"),
    (["model.name=mine", *SHAPE, "model.vision.width=66", "model.vision.heads=3"],
     "model.vision.width: 66 is not a multiple of 4, which pos_embed 'sincos' needs"),
    (["phases.0.mask_ratio=1.0"], "phases.0.mask_ratio: 1.0 is outside [0, 1)"),
    (["phases.1.mask_ratio=-0.1"], "phases.1.mask_ratio: -0.1 is outside [0, 1)"),
    (["model.text_mask_ratio=0.5"],
     "'model.text_mask_ratio' is not a ModelConfig key; text masking is set per phase: phases[i].text_mask_ratio"),
    (["phases.0.text_mask_ratio=1.5"], "phases.0.text_mask_ratio: 1.5 is outside [0, 1)"),
    (["model.text_mask=words"], "model.text_mask: 'words' is not allowed; choose one of 'random', 'pad_first'"),
    (["optim.no_decay=timm"], "optim.no_decay: 'timm' is not allowed; choose one of 'flip', 'openclip'"),
    (["train.global_batch=100"], "train.global_batch: 100 is not a multiple of micro_batch 32 x world size 2 (= 64)"),
    (["train.accum_steps=2"], "train.global_batch: 64 != micro_batch 32 x accum_steps 2 x world size 2 (= 128)"),
    (["phases.0.micro_batch=24"], "train.global_batch: 64 is not a multiple of micro_batch 24 x world size 2 (= 48)"),
    (["phases.0.micro_batch=16", "train.accum_steps=1"],
     "phases.0.micro_batch: a phase's own micro batch needs derived accumulation (train.accum_steps: null)"),
    (["phases.1.micro_batch=0"], "phases.1.micro_batch: 0 must be > 0"),
    (["train.comm_timeout_s=0"], "train.comm_timeout_s: 0.0 must be > 0"),
    (["phases=[]"], "phases: a recipe needs at least one phase"),
    (["phases.5.samples=1"], "override 'phases.5.samples': 'phases.5' is not an index into a list of 2"),
    (["data.crop_scale=[0.5]"], "data.crop_scale: expected 2 values"),
    (["train.deepspeed=nowhere.json"], "train.deepspeed: 'nowhere.json' does not exist"),
    (["optim.base_lr"], "override 'optim.base_lr' must look like section.key=value"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[0][0] for c in CASES])
def test_config_error_is_one_line_with_exit_2(overrides, message, capsys):
    status = main(["train", "--config", RECIPE, "--dry-run", "--world-size", "2", *overrides])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err, err
    assert err.count("\n") == 1  # one line


def test_deepspeed_json_may_not_own_batch_or_precision(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 512}))
    assert main(["train", "--config", RECIPE, "--dry-run", f"train.deepspeed={bad}"]) == 2
    assert "sets 'train_batch_size', which the recipe owns" in capsys.readouterr().err
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"zero_optimization": {"stage": 3}, "stage3_prefetch_bucket_size": 5e4}))
    assert main(["train", "--config", RECIPE, "--dry-run", f"train.deepspeed={stray}"]) == 2
    assert "belong in zero_optimization" in capsys.readouterr().err


def test_unknown_key_in_yaml_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: tiny, widht: 3}\nphases: [{name: a, samples: 64}]\n")
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    assert "unknown key 'model.widht'" in capsys.readouterr().err


def test_a_shape_of_ones_own_passes_the_dry_run(capsys):
    assert main(["train", "--config", RECIPE, "--dry-run", "--world-size", "2", "model.name=mine", *SHAPE]) == 0
    r = load_recipe(RECIPE, ["model.name=mine", *SHAPE])
    s = r.model.sizes
    assert (s.patch_size, s.vision_width, s.vision_heads, s.text_width, s.embed_dim) == (8, 64, 4, 32, 48)
    assert (s.vision_mlp_ratio, s.text_mlp_ratio) == (4.0, 4.0)  # not given: timm's 4


def test_missing_recipe_file(capsys):
    assert main(["train", "--config", "nope.yaml", "--dry-run"]) == 2
    assert "recipe file 'nope.yaml' does not exist" in capsys.readouterr().err


def test_overrides_are_typed_and_applied():
    r = load_recipe(RECIPE, ["model.name=B/16", "train.global_batch=65536", "phases.0.mask_ratio=0.75",
                             "optim.betas=[0.9, 0.98]", "resume=none"])
    assert (r.model.name, r.train.global_batch, r.phases[0].mask_ratio) == ("B/16", 65536, 0.75)
    assert r.optim.betas == (0.9, 0.98) and r.resume == "none"


def test_errors_come_before_any_heavy_import():
    """The CLI rejects a bad recipe without importing torch or deepspeed (no process group, no model)."""
    code = ("import sys; from flip_ds.cli import main; "
            "rc = main(['train', '--config', 'configs/tiny_cpu.yaml', 'model.nam=x']); "
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'heavy import'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "unknown key 'model.nam'" in done.stderr


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads `4e-6` as a string (YAML 1.1); a recipe author means the number."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {base_lr: 4e-6}\ntrain: {global_batch: 6.4e4, micro_batch: 256}\n"
                      "phases: [{name: a, samples: 1.28e10}]\n")
    r = load_recipe(str(recipe), ["phases.0.warmup_samples=5e7"])
    assert r.optim.base_lr == 4e-6 and r.train.global_batch == 64000
    assert r.phases[0].samples == 12_800_000_000 and r.phases[0].warmup_samples == 50_000_000
