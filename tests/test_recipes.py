"""The paper recipes: each one's header against the paper's row, its steps against FLIP's own count,
its batch split on 64 / 256 / 512 GPUs, and the epoch-counted phases that give those steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flip_ds.checkpoint import kept_tags, tag_for
from flip_ds.cli import main
from flip_ds.config import IMAGENET_EPOCH, Recipe, load_recipe
from flip_ds.config_loader import ConfigError, from_dict, to_dict
from flip_ds.cost import Setting
from flip_ds.engine_config import load_engine_json, validate_for_launch
from flip_ds.plan import Cluster, plan
from flip_ds.schedule import PhasePlan

REPO = Path(__file__).resolve().parent.parent
G = 65536

# stem: model, dataset, samples seen (the paper's), mask %, zero-shot ImageNet-1k top-1 the header cites
# (None: the paper gives none for the row), masked-phase steps, warmup epochs, base lr, ZeRO stage on 64
# H100-80GB (the planner's choice where the recipe's engine JSON says "auto"), checkpointing
PAPER_ROWS = {
    "flip_b16_laion400m": ("B/16", "LAION-400M", "12.8B", 50, "68.0", 190_000, 40, 4e-6, 1, False),
    "flip_b16_laion400m_mask75": ("B/16", "LAION-400M", "12.8B", 75, None, 190_000, 40, 4e-6, 1, False),
    "flip_l16_laion400m": ("L/16", "LAION-400M", "12.8B", 50, "74.3", 190_000, 40, 4e-6, 1, False),
    "flip_l16_laion400m_mask75": ("L/16", "LAION-400M", "12.8B", 75, None, 190_000, 40, 4e-6, 1, False),
    "flip_l14_laion400m": ("L/14", "LAION-400M", "12.8B", 50, "74.6", 190_000, 40, 4e-6, 1, False),
    "flip_h14_laion400m": ("H/14", "LAION-400M", "12.8B", 50, "75.5", 190_000, 200, 4e-6, 1, False),
    "flip_h14_laion400m_mask75": ("H/14", "LAION-400M", "12.8B", 75, None, 190_000, 200, 4e-6, 1, False),
    "flip_l16_laion2b": ("L/16", "LAION-2B", "12.8B", 50, "75.8", 190_000, 40, 2e-6, 1, False),
    "flip_l16_laion2b_25.6b": ("L/16", "LAION-2B", "25.6B", 50, "76.6", 380_000, 40, 2e-6, 1, False),
    "flip_h14_laion2b": ("H/14", "LAION-2B", "12.8B", 50, "77.6", 190_000, 200, 2e-6, 1, False),
    "flip_h14_laion2b_25.6b": ("H/14", "LAION-2B", "25.6B", 50, "78.8", 380_000, 200, 2e-6, 3, True),
    "flip_h14_laion2b_25.6b_zero2": ("H/14", "LAION-2B", "25.6B", 50, "78.8", 380_000, 200, 2e-6, 2, False),
}
TUNING_STEPS = 1_900  # FLIP's README: unmasked tuning for 100 virtual epochs, 20 of them warmup


def recipe_path(stem: str) -> Path:
    return REPO / "configs" / f"{stem}.yaml"


def header_text(path: Path) -> str:
    """The comment block above the first key, as one line of words."""
    comments = path.read_text().split("\noutput_dir:")[0].splitlines()
    return " ".join(line.lstrip("#").strip() for line in comments)


def test_every_paper_recipe_in_configs_has_a_row_here():
    shipped = {p.stem for p in (REPO / "configs").glob("flip_*.yaml")}
    assert shipped == set(PAPER_ROWS)


@pytest.mark.parametrize("stem", PAPER_ROWS)
def test_header_cites_the_papers_row(stem):
    model, data, seen, mask, zero_shot, *_ = PAPER_ROWS[stem]
    text = header_text(recipe_path(stem))
    first = re.match(r"FLIP (\S+) on (LAION-\w+)(?: \(English\))?: ([\d.]+B) samples seen at a 64k batch, "
                     r"(\d+)% of the patches masked", text)
    assert first and first.groups() == (model, data, seen, str(mask)), text[:120]
    assert 'Reproduces: Li et al., "Scaling Language-Image Pre-training via Masking" (CVPR 2023)' in text
    row = re.search(r"FLIP ViT-(\S+) on (LAION-\w+) \(([\d.]+B) samples seen(?:, mask (\d+)%)?\): (?:([\d.]+)% "
                    r"zero-shot ImageNet-1k top-1|the paper reports no zero-shot ImageNet-1k number)", text)
    assert row, text
    assert row.group(1, 2, 3) == (model, data, seen)
    assert row.group(5) == zero_shot
    if zero_shot is None:  # the 75% rows cite the ablation they come from and their 50% row
        assert row.group(4) == "75" and "68.2%" in text and "69.5% after unmasked tuning" in text
        assert f"its 50% row is {stem.removesuffix('_mask75')}.yaml" in text
    steps = PAPER_ROWS[stem][5]
    assert f"{steps:,} steps, {steps * G / 1e9:.2f}B samples" in text


@pytest.mark.parametrize("stem", PAPER_ROWS)
def test_steps_are_flips_count_and_the_recipe_is_flips(stem):
    model, _, _, mask, _, masked_steps, warmup_epochs, lr, stage, checkpointing = PAPER_ROWS[stem]
    r = load_recipe(str(recipe_path(stem)))
    assert (r.model.name, r.train.global_batch, r.train.precision) == (model, G, "auto")
    assert (r.optim.base_lr, r.optim.betas, r.optim.weight_decay) == (lr, (0.9, 0.95), 0.2)
    # every recipe leaves the stage to "auto" but the ZeRO-3 / ZeRO-2 pair that compares two engines
    pinned = stem in ("flip_h14_laion2b_25.6b", "flip_h14_laion2b_25.6b_zero2")
    assert load_engine_json(r.train.deepspeed)["zero_optimization"]["stage"] == (stage if pinned else "auto")
    assert plan(r, Cluster(gpus=64, gpu_mem_gib=79.6), Setting(), 32000).zero.stage == stage
    assert r.model.activation_checkpointing is checkpointing
    masked, tuning = PhasePlan(r.phases, r.optim, G).spans
    assert (masked.steps, tuning.steps) == (masked_steps, TUNING_STEPS)
    assert masked.phase.mask_ratio == mask / 100 and masked.phase.warmup_samples == warmup_epochs * 19 * G
    assert (tuning.phase.mask_ratio, tuning.phase.base_lr, tuning.phase.reset_optimizer) == (0.0, 4e-8, True)
    assert tuning.phase.warmup_samples == 380 * G  # 20 virtual epochs of 19 steps
    kept = kept_tags(G, r.checkpoint.milestones, [s.first_step + s.steps for s in (masked, tuning)])
    assert tag_for(masked_steps) in kept  # the masked phase's last step, kept for ablations of the tuning
    half = 32768  # a user's smaller batch: 39 steps an epoch, and the kept phase end moves with them
    small = load_recipe(str(recipe_path(stem)), [f"train.global_batch={half}"])
    small_masked = PhasePlan(small.phases, small.optim, half).spans[0]
    assert small_masked.steps == masked_steps // 19 * 39 and not small.checkpoint.milestones


@pytest.mark.parametrize("stem", PAPER_ROWS)
def test_splits_on_64_256_512_gpus_and_fits_64_h100(stem):
    r = load_recipe(str(recipe_path(stem)))
    for world in (64, 256, 512):
        splits = validate_for_launch(r, world)
        assert [(s.micro, s.accum) for s in splits] == [(128, G // (128 * world))] * 2
    assert plan(r, Cluster(gpus=64, gpu_mem_gib=79.6), Setting(), 32000).fits


def test_flips_epoch_is_19_steps_at_64k_where_counting_samples_runs_2_9_percent_more():
    assert IMAGENET_EPOCH // G == 19
    by_epochs = load_recipe(str(recipe_path("flip_b16_laion400m")))
    by_samples = load_recipe(str(recipe_path("flip_b16_laion400m")),
                             ["phases.0.epochs=null", "phases.0.warmup_epochs=0",
                              f"phases.0.samples={10_000 * IMAGENET_EPOCH}"])
    assert PhasePlan(by_epochs.phases, by_epochs.optim, G).spans[0].steps == 190_000
    assert PhasePlan(by_samples.phases, by_samples.optim, G).spans[0].steps == 195_491  # ceil(12,811,670,000 / 65536)


def test_epochs_follow_the_global_batch_and_the_epoch_size():
    r = load_recipe(str(recipe_path("flip_b16_laion400m")), ["train.global_batch=32768"])
    assert PhasePlan(r.phases, r.optim, 32768).spans[0].steps == 10_000 * 39  # 1,281,167 // 32,768
    r = load_recipe(str(recipe_path("flip_b16_laion400m")), ["epoch_samples=131072"])
    assert PhasePlan(r.phases, r.optim, G).spans[0].steps == 20_000


def test_the_saved_recipe_reloads_to_the_same_steps():
    """A checkpoint's recipe.yaml is the resolved recipe: its phases in samples of whole steps."""
    r = load_recipe(str(recipe_path("flip_h14_laion2b_25.6b")))
    again = from_dict(Recipe, yaml.safe_load(yaml.safe_dump(to_dict(r))))
    assert [p.epochs for p in again.phases] == [None, None]
    steps = [(s.steps, s.phase.warmup_samples) for s in PhasePlan(again.phases, again.optim, G).spans]
    assert steps == [(380_000, 200 * 19 * G), (1_900, 20 * 19 * G)]


EPOCH_ERRORS = [
    (["phases.0.samples=1000000"],
     "phases.0: give the phase's length as samples or as epochs, exactly one (got samples=1000000, epochs=10000)"),
    (["phases.0.epochs=null"],
     "phases.0: give the phase's length as samples or as epochs, exactly one (got samples=None, epochs=None)"),
    (["phases.0.warmup_samples=65536"],
     "phases.0.warmup_samples: a phase given in epochs takes warmup_epochs, not warmup_samples"),
    (["phases.0.epochs=null", "phases.0.samples=1000000"],
     "phases.0.warmup_epochs: a phase given in samples takes warmup_samples, not warmup_epochs"),
    (["phases.1.warmup_epochs=101"], "phases.1.warmup_epochs: 101 must be in [0, epochs=100]"),
    (["phases.1.epochs=0"], "phases.1.epochs: 0 must be > 0"),
    (["epoch_samples=65535"],
     "phases.0.epochs: an epoch of epoch_samples=65535 is less than one global batch (65536); "
     "give this phase in samples"),
    (["epoch_samples=0"], "epoch_samples: 0 must be > 0"),
]


@pytest.mark.parametrize("overrides,message", EPOCH_ERRORS, ids=[" ".join(c[0]) for c in EPOCH_ERRORS])
def test_a_bad_length_is_one_line_with_exit_2(overrides, message, capsys):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(str(recipe_path("flip_b16_laion400m")), overrides)
    assert main(["train", "--config", str(recipe_path("flip_b16_laion400m")), "--dry-run", "--world-size", "64",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert err == f"flip-ds: error: {message}\n"


@pytest.mark.parametrize("grid_path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_grid_and_its_base_recipe_load(grid_path, monkeypatch):
    """Each grid in configs/sweeps/ expands into cells whose recipes pass the loader's checks (a
    renamed key or a typo in a grid or in its base fails here, not in a user's sweep)."""
    from flip_ds.sweep import load_grid

    monkeypatch.chdir(REPO)
    grid = load_grid(str(grid_path.relative_to(REPO)))
    load_recipe(grid.base)
    cells = grid.cells()
    assert cells
    for cell in cells:
        assert isinstance(grid.recipe(cell, []), Recipe), cell
