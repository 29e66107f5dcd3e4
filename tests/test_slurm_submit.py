"""`flip-ds slurm` before anything reaches a scheduler: validation for the world size, the sbatch
command it builds, chaining; and the template's own checks. No cluster needed (tests/test_slurm.py
submits for real)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

from flip_ds.cli import main

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
H14 = str(REPO / "configs" / "flip_h14_laion2b_25.6b.yaml")


def slurm(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["slurm", *argv])
    return status, out.getvalue(), err.getvalue()


def test_dry_run_validates_for_the_world_size_and_prints_a_chain_of_sbatch_commands():
    status, out, err = slurm("--config", H14, "--nodes", "8", "--gpus-per-node", "8", "--time", "24:00:00",
                             "--partition", "gpu", "--account", "proj", "--chain", "3", "--max-restarts", "5",
                             "--sbatch-arg=--exclusive", "--dry-run", "data.workers=6", "output_dir=/scratch/h14")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == ("recipe ok: world size 64: 128 per device x 8 accumulation x 64 ranks = global batch 65536; "
                        "25028198400 samples in 2 phase(s)")  # (380,000 + 1,900) steps x 65,536
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 3
    for k, cmd in enumerate(commands):
        assert cmd[:2] == ["sbatch", "--parsable"]
        assert {"--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu",
                "--account=proj", "--signal=B:USR1@300", "--exclusive", "--output=/scratch/h14/slurm/%x-%j.out",
                "--job-name=flip_h14_laion2b_25.6b"} <= set(cmd)
        assert f"--export=ALL,FLIP_PYTHON={sys.executable},FLIP_MAX_RESTARTS=5" in cmd
        assert ("--dependency=afterany:$PREVIOUS_JOB" in cmd) == (k > 0)
        # the template, then the recipe and its overrides exactly as given
        assert cmd[-4:] == [str(TEMPLATE), H14, "data.workers=6", "output_dir=/scratch/h14"]


def test_cpu_nodes_get_tasks_but_no_gpus():
    status, out, _ = slurm("--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--nodes", "2", "--gpus-per-node",
                           "0", "--dry-run")
    assert status == 0
    cmd = shlex.split(out.strip().splitlines()[1])
    assert "--ntasks-per-node=1" in cmd and not any(a.startswith("--gpus") for a in cmd)
    assert "world size 2:" in out


def test_a_recipe_that_cannot_run_is_refused_with_its_own_one_line_error():
    cases = [(["data.workers=-1"], "data.workers: -1 must be >= 0"),
             (["train.bogus=3"], "unknown key 'train.bogus'"),
             (["--nodes", "3"], "train.global_batch: 65536 is not a multiple of micro_batch 128 x world size 24"),
             (["train.deepspeed=ds_configs/zero9.json"], "train.deepspeed: 'ds_configs/zero9.json' does not exist")]
    for extra, error in cases:
        status, out, err = slurm("--config", H14, "--gpus-per-node", "8", *extra)
        assert status == 2 and out == "", (extra, out)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"flip-ds: error: {error}"), err


def test_recipe_ok_is_the_validators_split_and_train_dry_runs_line():
    """`slurm` validates as `train --dry-run --world-size N` does, and says the same: here with a phase of
    its own micro batch, so each phase's split (as validate_for_launch cuts it) is named."""
    from flip_ds.config import load_recipe
    from flip_ds.engine_config import validate_for_launch

    overrides = ["phases.0.micro_batch=64"]
    status, out, err = slurm("--config", H14, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", *overrides)
    assert status == 0, err
    dry = io.StringIO()
    with contextlib.redirect_stdout(dry):
        assert main(["train", "--config", H14, "--dry-run", "--world-size", "16", *overrides]) == 0
    line = out.splitlines()[0]
    assert line == "recipe ok: " + dry.getvalue().splitlines()[-1].removeprefix("# ")
    recipe = load_recipe(H14, overrides)
    splits = validate_for_launch(recipe, 16)
    assert line == ("recipe ok: world size 16: " + "; ".join(
        f"{phase.name} {s.micro} per device x {s.accum} accumulation" for phase, s in zip(recipe.phases, splits))
        + f" x 16 ranks = global batch 65536; {recipe.total_samples} samples in 2 phase(s)")
    assert [(s.micro, s.accum) for s in splits] == [(64, 64), (128, 32)]


def test_bad_options_are_refused_before_anything_runs():
    for extra in (["--chain", "0"], ["--nodes", "0"], ["--signal-seconds", "0"], ["--template", "/nonexistent"]):
        status, _, err = slurm("--config", H14, *extra)
        assert status == 2 and err.startswith("flip-ds: error: "), (extra, err)


def test_template_is_valid_bash_and_carries_requeue_signal_and_append():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
    header = re.findall(r"^#SBATCH (\S+)", TEMPLATE.read_text(), flags=re.M)
    assert {"--requeue", "--open-mode=append", "--signal=B:USR1@300"} <= set(header)


def test_template_refuses_to_start_without_a_recipe():
    done = subprocess.run(["bash", str(TEMPLATE)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: sbatch [options]" in done.stdout
