"""The training engine end to end: real DeepSpeed (ZeRO-1/2/3), 2 CPU ranks over gloo, real shards,
real TensorBoard files read back, real signals and kills."""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest

from flip_ds.train import EXIT_PREEMPTED, EXIT_RECIPE_OR_DATA
from tests.distributed_helpers import scalars, spawn_ranks, texts, torchrun
from tests.engine_helpers import ZERO3_PARTITION_ALL, write_json

G = 16  # global batch: 8 per rank


def train_args(demo, out: Path, *overrides: str, ds: str | None = None, steps: tuple[int, int] = (10, 2)) -> list[str]:
    """The tiny recipe on the test's small built-in dataset: `steps` optimizer steps per phase."""
    return ["train", "--config", "configs/tiny_cpu.yaml", f"output_dir={out}", "resume=auto",
            f"data.train=[{{shards: '{demo.train}'}}]", f"data.tokenizer={demo.tokenizer}", "data.workers=1",
            "data.sample_shuffle=64", f"train.global_batch={G}", f"train.micro_batch={G // 2}",
            f"phases.0.samples={steps[0] * G}", f"phases.0.warmup_samples={2 * G}",
            f"phases.1.samples={steps[1] * G}", "phases.1.warmup_samples=0", "checkpoint.every_samples=0",
            "logging.every_steps=1", "eval.sets=[]", *([f"train.deepspeed={ds}"] if ds else []), *overrides]


def wait_all(procs, timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout))
    return out


def losses(out: Path) -> dict[int, float]:
    return scalars(out / "tensorboard", "train/loss")


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory) -> str:
    return write_json(tmp_path_factory.mktemp("ds") / "zero3.json", ZERO3_PARTITION_ALL)


@pytest.fixture(scope="module")
def reference_run(demo_shards, zero3_json, tmp_path_factory) -> Path:
    """12 uninterrupted fp32 steps (10 masked + 2 unmasked), checkpoints every 4 steps, at the phase
    end (10) and a milestone at step 11: the curve the resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    done = torchrun(train_args(demo_shards, out, "train.precision=fp32", f"checkpoint.every_samples={4 * G}",
                               f"checkpoint.milestones=[{11 * G}]", ds=zero3_json))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_zero3_bf16_with_activation_checkpointing_learns_from_shards(demo_shards, zero3_json, tmp_path):
    out = tmp_path / "run"
    done = torchrun(train_args(demo_shards, out, "train.precision=bf16", "model.activation_checkpointing=true",
                               "optim.base_lr=4e-3", ds=zero3_json, steps=(30, 2)))
    assert done.returncode == 0, done.stdout + done.stderr
    curve = [v for _, v in sorted(losses(out).items())]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.1, curve  # the loss falls


def test_reference_run_writes_every_scalar_and_the_phase_switch(reference_run):
    tb = reference_run / "tensorboard"
    for tag in ["train/loss", "train/lr", "train/temperature", "train/grad_norm", "train/samples_seen",
                "train/phase", "train/mask_ratio", "train/nonfinite_skipped", "perf/samples_per_s",
                "perf/samples_per_s_per_device", "perf/tflops_per_device", "memory/peak_gb", "time/data_wait_s",
                "time/forward_backward_s", "time/optimizer_s", "data/samples_read", "data/corrupt_image"]:
        assert scalars(tb, tag), tag
    mask = scalars(tb, "train/mask_ratio")
    assert all(mask[s] == 0.5 for s in range(G, 10 * G + 1, G))  # phase 0: 10 steps masked
    assert all(mask[s] == 0.0 for s in (11 * G, 12 * G))  # the switch is at sample 160
    lr = scalars(tb, "train/lr")
    assert lr[11 * G] == pytest.approx(2e-4 * G / 256)  # phase 1 restarts at its own peak (no warmup)
    assert lr[10 * G] < 0.05 * lr[3 * G]  # phase 0 decayed by cosine towards zero
    meta = json.loads((reference_run / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["samples_seen"] == 12 * G and meta["phase"] == "unmasked_tuning"
    # the precision and why: in meta.json and TensorBoard
    assert meta["precision"] == "fp32" and meta["precision_reason"].startswith("fp32 as asked")
    assert texts(tb, "run/precision") == [f"fp32: {meta['precision_reason']}"]


def test_zero_stages_agree_in_fp32_and_resume_exactly(demo_shards, reference_run, tmp_path):
    """ZeRO-1 and ZeRO-2 give the ZeRO-3 reference's losses for the first steps, and resume exactly
    (under ZeRO-1/2 DeepSpeed keeps one client state for all ranks: each rank must find its own
    data position in it)."""
    ref = losses(reference_run)
    for stage in (1, 2):
        ds = write_json(tmp_path / f"z{stage}.json", {"zero_optimization": {"stage": stage}})
        out = tmp_path / f"z{stage}"
        args = train_args(demo_shards, out, "train.precision=fp32", "phases.0.samples=64", "phases.1.samples=16",
                          f"checkpoint.milestones=[{2 * G}]", ds=ds)
        done = torchrun(args)
        assert done.returncode == 0, done.stdout + done.stderr
        for samples, loss in losses(out).items():
            if samples <= 4 * G:
                assert loss == pytest.approx(ref[samples], abs=1e-5), (stage, samples)
        if stage == 2:
            resumed = tmp_path / "z2_resumed"
            done = torchrun([*args, f"output_dir={resumed}", f"resume={out / 'checkpoints' / 'step_00000002'}"])
            assert done.returncode == 0, done.stdout + done.stderr
            for samples in (3 * G, 4 * G):
                assert losses(resumed)[samples] == pytest.approx(losses(out)[samples], abs=1e-6)


def test_kill_9_one_rank_then_resume_auto_matches_uninterrupted(demo_shards, zero3_json, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = train_args(demo_shards, out, "train.precision=fp32", f"checkpoint.every_samples={4 * G}", ds=zero3_json)
    procs = spawn_ranks(args)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.exists() and latest.read_text().strip() == "step_00000008"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint at step 8"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[0].kill()  # what torchrun/srun do to the survivors when a rank dies
    wait_all(procs)
    # debris of a save interrupted by the kill: shards without meta.json, newer than `latest`
    debris = out / "checkpoints" / "step_00000010"
    if not debris.exists():
        shutil.copytree(out / "checkpoints" / "step_00000008", debris)
        (debris / "meta.json").unlink()
    done = torchrun(args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout and "step_00000008" in done.stdout
    ref, resumed = losses(reference_run), losses(out)
    for samples in range(9 * G, 12 * G + 1, G):  # steps after the checkpoint, across the phase switch
        assert resumed[samples] == pytest.approx(ref[samples], abs=1e-6), samples


def test_resume_from_either_side_of_the_phase_switch(demo_shards, zero3_json, reference_run, tmp_path):
    """From the checkpoint at the switch (the optimizer reset still to come) and from one after it."""
    ref = losses(reference_run)
    src = reference_run / "checkpoints"
    for tag, first in (("step_00000010", 11), ("step_00000011", 12)):
        out = tmp_path / tag
        done = torchrun(train_args(demo_shards, out, "train.precision=fp32", f"resume={src / tag}", ds=zero3_json))
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("optimizer state reset" in done.stdout) == (first == 11)
        resumed = losses(out)
        for samples in range(first * G, 12 * G + 1, G):
            assert resumed[samples] == pytest.approx(ref[samples], abs=1e-6), samples


def test_sigusr1_then_a_second_signal_checkpoint_exit_75_and_resume(demo_shards, zero3_json, tmp_path):
    """SLURM's warning signal makes every rank finish its step, save and exit 75; a SIGTERM arriving
    during the save changes nothing; the rerun resumes from that checkpoint."""
    out = tmp_path / "signalled"
    args = train_args(demo_shards, out, "train.precision=bf16", ds=zero3_json, steps=(400, 2))
    procs = spawn_ranks(args)
    deadline = time.time() + 240
    while _logged_steps(out) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.1)
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # SLURM signals every task of the step
        for p in procs:
            p.send_signal(sig)
        time.sleep(0.2)
    results = wait_all(procs)
    assert [rc for rc, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], results
    assert "stopped by signal" in results[0][1]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / tag / "meta.json").read_text())
    assert 3 * G <= meta["samples_seen"] < 400 * G
    shards = sorted(p.name for p in (out / "checkpoints" / tag).glob("*model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    done = torchrun([*args, f"phases.0.samples={meta['samples_seen'] + 2 * G}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'checkpoints' / tag}" in done.stdout


def test_a_stalled_rank_makes_the_others_exit_non_zero_within_the_comm_timeout(demo_shards, zero3_json, tmp_path):
    """A rank that stops making progress (SIGSTOP: a hung GPU, a stuck file system) must not hold
    the job: the other rank's next collective fails after train.comm_timeout_s and it exits."""
    out = tmp_path / "stalled"
    timeout_s = 5
    procs = spawn_ranks(train_args(demo_shards, out, f"train.comm_timeout_s={timeout_s}", ds=zero3_json,
                                   steps=(400, 2)))
    try:
        deadline = time.time() + 240
        while _logged_steps(out) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        procs[0].communicate(timeout=timeout_s + 60)
        waited = time.time() - stopped
        assert procs[0].returncode not in (0, EXIT_PREEMPTED, EXIT_RECIPE_OR_DATA), procs[0].returncode
        assert waited < timeout_s + 30, waited  # DeepSpeed's default timeout would have held it 10 minutes
    finally:
        procs[1].kill()
        procs[1].communicate()


def _logged_steps(out: Path) -> int:
    tb = out / "tensorboard"
    if not tb.is_dir() or not any(tb.iterdir()):
        return 0
    try:
        return len(losses(out))
    except KeyError:  # no scalar written yet
        return 0


def _shards_with_one_bad_stream(demo, root: Path) -> tuple[str, list[str]]:
    """4 shards of the built-in data, split without resampling over 2 ranks x 2 workers (one shard a
    worker); every JPEG of the shard of rank 1's first worker is garbage. Returns (spec, bad shards)."""
    from webdataset import TarWriter

    from flip_ds.data.shards import ShardPlan, list_shards

    root.mkdir()
    sources = list_shards(demo.train)
    spec = str(root / "{00000..00003}.tar")
    # the training's own plan of these (not yet written) shards: seed 0 as in the recipe, no resampling
    plan = ShardPlan([[str(root / f"{i:05d}.tar") for i in range(4)]], [1.0], resample=False, seed=0)
    bad = plan.stream(1, 2, 0, 2).mine
    for i, src in enumerate(sources[:4]):
        path = str(root / f"{i:05d}.tar")
        with tarfile.open(src) as tar, TarWriter(path, encoder=False, mtime=0) as out:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
            for sample in samples.values():
                if path in bad and "jpg" in sample:
                    sample["jpg"] = b"\xff\xd8 not a jpeg"
                out.write(sample)
    return spec, bad


def test_a_rank_whose_shards_are_all_bad_neither_hangs_nor_is_silent(demo_shards, zero3_json, tmp_path):
    spec, bad = _shards_with_one_bad_stream(demo_shards, tmp_path / "shards")
    common = [f"data.train=[{{shards: '{spec}'}}]", "data.resample=false", "data.workers=2",
              "data.skip_rate_min_samples=8"]
    # tolerated: rank 1's other worker feeds it, nobody waits forever, and the skips are counted
    out = tmp_path / "tolerated"
    done = torchrun(train_args(demo_shards, out, *common, "data.max_skip_rate=1.0", ds=zero3_json, steps=(4, 1)),
                    timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(scalars(out / "tensorboard", "data/corrupt_image").values()) > 0
    # over the limit: every rank stops with the error naming the bad shard, and no rank hangs
    out = tmp_path / "limited"
    procs = spawn_ranks(train_args(demo_shards, out, *common, "data.max_skip_rate=0.3", ds=zero3_json))
    results = wait_all(procs, timeout=240)
    assert all(rc == EXIT_RECIPE_OR_DATA for rc, _ in results), results  # not worth a requeue
    assert any(Path(b).name in text for b in bad for _, text in results), results


def test_a_diverging_run_stops_after_max_nonfinite_steps_in_one_line_and_is_not_requeued(demo_shards, tmp_path):
    """An lr of 1e30 blows the weights up within a step; every step after that has a non-finite
    loss or gradient and is skipped (counted, whichever it is), and every rank stops with exit 2
    (which train.sbatch does not requeue) and a one-line error, rather than training on without
    updates. (A non-finite gradient from a finite loss: tests/test_engine.py.)"""
    out = tmp_path / "run"
    results = wait_all(spawn_ranks(train_args(demo_shards, out, "optim.base_lr=1e30", "train.max_nonfinite_steps=3")))
    assert [rc for rc, _ in results] == [EXIT_RECIPE_OR_DATA] * 2, results
    for rank, (_, text) in enumerate(results):
        errors = [line for line in text.splitlines() if line.startswith("flip-ds: error")]
        assert errors == [f"flip-ds: error (rank {rank}): 3 steps in a row with a non-finite loss or gradient at "
                          "step 3; lower the lr or check the data (train.max_nonfinite_steps)"], text
    skipped = scalars(out / "tensorboard", "train/nonfinite_skipped")
    assert skipped == {G: 0.0, 2 * G: 1.0, 3 * G: 2.0}, skipped  # logged as it went; the third skip stops the run


def test_resume_on_one_rank_then_on_two_continues_from_the_saved_samples(demo_shards, zero3_json, tmp_path):
    """A run saved on 2 ranks resumes on 1 and that one on 2 again (an allocation that came back
    smaller, then larger): DeepSpeed's universal checkpoint reshards weights and Adam's state, the
    data streams restart, and the run says so. With a high lr the temperature moves about 1% a step,
    so it shows whether the weights came back: a fresh model would restart at 0.07."""
    fast = ["train.precision=fp32", "optim.base_lr=0.05", f"checkpoint.every_samples={4 * G}",
            f"checkpoint.milestones=[{4 * G}]"]
    two = tmp_path / "two"
    done = torchrun(train_args(demo_shards, two, *fast, ds=zero3_json, steps=(8, 1)))
    assert done.returncode == 0, done.stdout + done.stderr
    tau = scalars(two / "tensorboard", "train/temperature")
    assert abs(tau[8 * G] - 0.07) > 0.005 * 0.07  # it moved
    one = tmp_path / "one"
    done = torchrun([*train_args(demo_shards, one, *fast, ds=zero3_json, steps=(8, 1)), f"train.micro_batch={G}",
                     f"resume={two / 'checkpoints' / 'step_00000004'}"], nproc=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world size changed from 2 to 1 ranks" in done.stdout
    resumed = scalars(one / "tensorboard", "train/temperature")
    assert sorted(resumed) == [5 * G, 6 * G, 7 * G, 8 * G, 9 * G]  # from the saved samples on
    step = abs(tau[5 * G] - tau[4 * G])  # one update's move
    assert abs(resumed[5 * G] - tau[5 * G]) < 2.5 * step < abs(tau[5 * G] - 0.07), (resumed, tau)
    assert abs(losses(one)[8 * G] - losses(two)[8 * G]) < 0.5
    back = tmp_path / "back"  # saved on 1 rank, resumed on 2 for the last step
    done = torchrun([*train_args(demo_shards, back, *fast, ds=zero3_json, steps=(8, 1)),
                     f"resume={one / 'checkpoints' / 'step_00000008'}"], nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world size changed from 1 to 2 ranks" in done.stdout
    again = scalars(back / "tensorboard", "train/temperature")
    assert sorted(again) == [9 * G]
    assert abs(again[9 * G] - resumed[8 * G]) < 2.5 * step


def test_resume_with_other_loader_workers_restarts_the_data_streams(demo_shards, zero3_json, reference_run, tmp_path):
    out = tmp_path / "workers"
    done = torchrun([*train_args(demo_shards, out, "train.precision=fp32", ds=zero3_json), "data.workers=2",
                     f"resume={reference_run / 'checkpoints' / 'step_00000010'}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data.workers changed from 1 to 2: the data streams start anew" in done.stdout
    assert sorted(losses(out)) == [11 * G, 12 * G]


def test_init_from_starts_a_fresh_schedule_from_trained_weights(demo_shards, zero3_json, reference_run, tmp_path):
    out = tmp_path / "init"
    done = torchrun(train_args(demo_shards, out, "train.precision=fp32", f"init_from={reference_run}",
                               ds=zero3_json, steps=(2, 1)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "initialised from the weights of" in done.stdout and "resumed from" not in done.stdout
    ref_tau, tau = (scalars(d / "tensorboard", "train/temperature") for d in (reference_run, out))
    assert sorted(tau) == [G, 2 * G, 3 * G]  # samples start at 0 again
    assert scalars(out / "tensorboard", "train/lr")[G] == scalars(reference_run / "tensorboard", "train/lr")[G]
    trained_move = abs(ref_tau[12 * G] - 0.07)
    assert abs(tau[G] - ref_tau[12 * G]) < 0.5 * trained_move  # the trained temperature, not 0.07
    [(status, output)] = wait_all(spawn_ranks(train_args(demo_shards, tmp_path / "bad", "model.name=B/16",
                                                         f"init_from={reference_run}", ds=zero3_json, steps=(2, 1)),
                                              nproc=1))
    assert status == 2 and "init_from: " in output and "does not fit this recipe's model (B/16" in output, output


def test_a_phase_with_its_own_micro_batch_changes_the_accumulation_and_matches_one_big_batch(demo_shards,
                                                                                            zero3_json, tmp_path):
    """Phase 0 in micro batches of 4 (2 feature-cache micro batches a step on each of 2 ranks),
    phase 1 in the recipe's 8 (no accumulation); unmasked, so the masks do not depend on the cut:
    every loss equals the run with micro batch 8 throughout."""
    common = ["train.precision=fp32", "phases.0.mask_ratio=0.0", "data.sample_shuffle=64"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for out, extra in ((whole, []), (cut, ["phases.0.micro_batch=4"])):
        done = torchrun(train_args(demo_shards, out, *common, *extra, ds=zero3_json, steps=(3, 2)))
        assert done.returncode == 0, done.stdout + done.stderr
    assert "global batch 16 = 4 x 2 accum or 8 x 1 accum x 2" in done.stdout
    assert "micro batch 4 x 2 accum" in done.stdout and "micro batch 8 x 1 accum" in done.stdout
    reference, ours = losses(whole), losses(cut)
    assert sorted(ours) == sorted(reference) == [s * G for s in range(1, 6)]
    for samples, loss in reference.items():
        assert ours[samples] == pytest.approx(loss, abs=1e-5), samples
