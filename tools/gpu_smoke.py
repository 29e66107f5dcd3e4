"""Every product path that differs on a GPU, run the way a user runs it, one stage after another.

Run through tools/gpu_smoke.sh (which sets up a GPU machine without internet). On a GPU: the tiny
recipe under torchrun with one process (a real NCCL process group), the kill -9 + resume=auto
check, eval, export, ZeRO-1/2/3 and `flip-ds bench` on B/16. With --cpu the same stages run on
this CPU at tiny size (the test suite does this, so the script cannot rot).

Each stage prints PASS / FAIL / SKIP (a stage whose input failed is skipped); the figures go into
one JSON; the exit status is non-zero when a stage failed, and the last line names the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BATCH = 32  # global = micro: one process
STEPS = (12, 4)  # masked, then unmasked tuning
CHECKPOINT_EVERY = 8  # steps; the kill lands after the first one


@dataclass(frozen=True)
class Sizes:
    bench: list[str]  # flip-ds bench arguments
    resume_tolerance: float  # largest |loss difference| after a kill + resume
    timeout_s: float  # per command


GPU = Sizes(["--model", "B/16", "--batch", "128", "--zero", "1", "--masks", "0", "0.5", "0.75", "--steps", "3",
             "--rounds", "3"], resume_tolerance=2e-3, timeout_s=420)
CPU = Sizes(["--smoke", "--zero", "1", "--masks", "0", "0.5", "0.75"], resume_tolerance=1e-5, timeout_s=300)


class StageFailed(Exception):
    pass


class Smoke:
    def __init__(self, out: Path, sizes: Sizes, device: str) -> None:
        self.out, self.sizes, self.device = out, sizes, device
        self.results: dict[str, dict[str, Any]] = {}

    # -- running commands -----------------------------------------------------------------------
    def command(self, stage: str, args: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
        """`flip-ds ARGS` (under torchrun with one process when `torchrun`), its output kept in OUT/logs."""
        cmd = [sys.executable, "-m", "flip_ds", *args]
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "flip_ds", *args]
        log = self.out / "logs" / f"{stage}.log"
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                  timeout=self.sizes.timeout_s)
        if done.returncode != 0:
            tail = log.read_text().splitlines()[-15:]
            raise StageFailed(f"exit {done.returncode}: {' '.join(args[:2])}\n    " + "\n    ".join(tail))
        return done

    def train_args(self, out: Path, *overrides: str) -> list[str]:
        data = self.out / "data"
        masked, tuning = STEPS
        return ["train", "--config", "configs/tiny_cpu.yaml", f"output_dir={out}", "resume=auto",
                f"data.train=[{{shards: '{data}/train/{{00000..00003}}.tar'}}]",
                f"data.tokenizer={data}/tokenizer.model", "data.workers=2", "data.sample_shuffle=128",
                f"train.global_batch={BATCH}", f"train.micro_batch={BATCH}",
                f"phases.0.samples={masked * BATCH}", f"phases.0.warmup_samples={2 * BATCH}",
                f"phases.1.samples={tuning * BATCH}", "phases.1.warmup_samples=0",
                f"checkpoint.every_samples={CHECKPOINT_EVERY * BATCH}", "logging.every_steps=1",
                f"eval.every_samples={CHECKPOINT_EVERY * BATCH}",
                f"eval.sets.0.path={data}/eval/zero_shot", f"eval.sets.0.classnames={data}/eval/classnames.txt",
                f"eval.sets.0.templates={data}/eval/templates.txt", f"eval.sets.1.path={data}/eval/retrieval.jsonl",
                *overrides]

    # -- the stages -----------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        self.command("data", ["demo-data", "--out", str(self.out / "data"), "--train-samples", "512",
                              "--samples-per-shard", "128", "--eval-per-class", "4", "--retrieval-images", "32"])
        return {"train_samples": 512}

    def train(self) -> dict[str, Any]:
        run = self.out / "train"
        self.command("train", self.train_args(run), torchrun=True)
        loss = scalars(run / "tensorboard", "train/loss")
        assert_(len(loss) == sum(STEPS), f"{len(loss)} logged steps, expected {sum(STEPS)} (logging every step)")
        evals = scalars(run / "tensorboard", "eval/demo_zeroshot/top1")
        assert_(len(evals) >= 2, f"in-training eval ran {len(evals)} time(s), expected >= 2")
        meta = json.loads((run / "checkpoints" / "step_00000016" / "meta.json").read_text())
        speed = list(scalars(run / "tensorboard", "perf/samples_per_s").values())[1:]  # the first includes start-up
        return {"precision": meta["precision"], "precision_reason": meta["precision_reason"],
                "loss_first": loss[min(loss)], "loss_last": loss[max(loss)],
                "samples_per_s_median": statistics.median(speed),
                "peak_memory_gb": max(scalars(run / "tensorboard", "memory/peak_gb").values()),
                "zero_shot_top1_in_training": evals[max(evals)]}

    def resume(self) -> dict[str, Any]:
        run = self.out / "killed"
        args = self.train_args(run)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "flip_ds",
               *args]
        with (self.out / "logs" / "resume.log").open("a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            deadline = time.time() + self.sizes.timeout_s
            while not (run / "checkpoints" / "latest").is_file():
                assert_(proc.poll() is None, f"the run to be killed ended first (exit {proc.returncode})")
                assert_(time.time() < deadline, "no checkpoint before the timeout")
                time.sleep(0.1)
            saved = (run / "checkpoints" / "latest").read_text().strip()
            for worker in _children(proc.pid):  # the training process dies mid-run, as a crashed rank does;
                os.kill(worker, signal.SIGKILL)  # torchrun (which started it in a session of its own) then ends
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.command("resume", args, torchrun=True)
        ours, reference = scalars(run / "tensorboard", "train/loss"), scalars(self.out / "train" / "tensorboard",
                                                                               "train/loss")
        resumed_from = int(saved.removeprefix("step_")) * BATCH
        after = [s for s in reference if s > resumed_from]
        assert_(after and all(s in ours for s in after), f"the resumed run did not log steps after {resumed_from}")
        worst = max(abs(ours[s] - reference[s]) for s in after)
        assert_(worst <= self.sizes.resume_tolerance,
                f"resumed losses differ from the uninterrupted run's by up to {worst:.2e}")
        return {"killed_after_checkpoint": saved, "steps_compared": len(after), "max_loss_difference": worst}

    def eval(self) -> dict[str, Any]:
        data, run = self.out / "data", self.out / "train"
        zs, rt = self.out / "eval_zero_shot.json", self.out / "eval_retrieval.json"
        self.command("eval", ["eval", "zero-shot", str(run), "--data", f"{data}/eval/zero_shot", "--classnames",
                              f"{data}/eval/classnames.txt", "--templates", f"{data}/eval/templates.txt",
                              "--json", str(zs), "--no-progress"])
        self.command("eval", ["eval", "retrieval", str(run), "--data", f"{data}/eval/retrieval.jsonl",
                              "--json", str(rt), "--no-progress"])
        zero_shot, retrieval = json.loads(zs.read_text()), json.loads(rt.read_text())
        assert_(zero_shot["device"].startswith(self.device), f"eval ran on {zero_shot['device']}")
        return {"zero_shot": zero_shot["metrics"], "retrieval": retrieval["metrics"],
                "precision": zero_shot["settings"]["precision"]}

    def export(self) -> dict[str, Any]:
        model, vision = self.out / "model.safetensors", self.out / "vision_timm.safetensors"
        self.command("export", ["export", str(self.out / "train"), "--out", str(model), "--timm-out", str(vision)])
        code = ("import sys, torch, flip_ds; device = sys.argv[2]\n"
                "model, tokenizer, recipe = flip_ds.load(sys.argv[1], device=device)\n"
                "assert 'deepspeed' not in sys.modules, 'loading pulled in DeepSpeed'\n"
                "size = recipe.model.resolved_image_size\n"
                "with torch.no_grad():\n"
                "    image = model.encode_image(torch.rand(2, 3, size, size, device=device))\n"
                "    tokens = torch.from_numpy(tokenizer(['a red circle', 'a blue square'])).to(device)\n"
                "    text = model.encode_text(tokens)\n"
                "print(image.device, tuple(image.shape), float((image @ text.t()).abs().max()))")
        done = subprocess.run([sys.executable, "-c", code, str(model), self.device], capture_output=True, text=True,
                              cwd=REPO, timeout=self.sizes.timeout_s)
        assert_(done.returncode == 0, f"loading the export without DeepSpeed failed: {done.stderr[-1500:]}")
        device, shape = done.stdout.split()[0], done.stdout.split(")")[0] + ")"
        assert_(device.startswith(self.device), f"the loaded model ran on {device}")
        return {"export_mb": round(model.stat().st_size / 2**20, 2), "loaded_on": device,
                "image_embedding": shape.split(" ", 1)[1]}

    def zero_stages(self) -> dict[str, Any]:
        first = {3: scalars(self.out / "train" / "tensorboard", "train/loss")[BATCH]}
        for stage in (1, 2):
            run = self.out / f"zero{stage}"
            self.command("zero", self.train_args(run, f"train.deepspeed=ds_configs/zero{stage}.json",
                                                 f"phases.0.samples={2 * BATCH}", f"phases.1.samples={BATCH}",
                                                 "eval.every_samples=0", "eval.at_end=false"), torchrun=True)
            first[stage] = scalars(run / "tensorboard", "train/loss")[BATCH]
        spread = max(first.values()) - min(first.values())
        assert_(spread < 0.05 * first[3], f"first-step losses differ across ZeRO stages: {first}")
        return {f"zero{s}_first_loss": v for s, v in sorted(first.items())}

    def bench(self) -> dict[str, Any]:
        out = self.out / "bench.json"
        self.command("bench", ["bench", *self.sizes.bench, "--json", str(out)], torchrun=True)
        result = json.loads(out.read_text())
        rows = {r["mask"]: r for r in result["rows"]}
        assert_(set(rows) == {0.0, 0.5, 0.75}, f"bench rows for masks {sorted(rows)}")
        assert_(all(0 < r["mfu"] < 1 for r in rows.values()), "an MFU outside (0, 1)")
        return {"model": result["spec"]["model"], "device": result["machine"]["device"],
                "peak_tflops": result["peak_tflops_per_rank"],
                **{f"mask_{m:g}": {"samples_per_s": r["samples_per_s"], "mfu": r["mfu"], "peak_gb": r["peak_gb"],
                                   "step_ratio_to_mask0": r["ratio_to_mask0"]} for m, r in sorted(rows.items())}}

    # -- the run --------------------------------------------------------------------------------
    def run(self, stages: list[tuple[str, Callable[[], dict[str, Any]], tuple[str, ...]]]) -> str | None:
        first_failure = None
        for name, fn, needs in stages:
            started = time.perf_counter()
            if any(self.results[n]["status"] != "PASS" for n in needs):
                self.results[name] = {"status": "SKIP", "why": f"needs {', '.join(needs)}"}
            else:
                try:
                    self.results[name] = {"status": "PASS", **fn()}
                except (StageFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
                    self.results[name] = {"status": "FAIL", "why": str(e) or traceback.format_exc(limit=2)}
                    first_failure = first_failure or name
            self.results[name]["seconds"] = round(time.perf_counter() - started, 1)
            r = self.results[name]
            detail = r.get("why") or ", ".join(f"{k}={_short(v)}" for k, v in r.items() if k not in ("status",))
            print(f"[gpu_smoke] {r['status']} {name} ({r['seconds']} s): {detail}", flush=True)
        return first_failure


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def assert_(condition: bool, message: str) -> None:
    if not condition:
        raise StageFailed(message)


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """{samples seen: value} of a TensorBoard scalar, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        raise StageFailed(f"no '{tag}' in {log_dir}")
    return {e.step: e.value for e in acc.Scalars(tag)}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every stage on this CPU at tiny size")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_smoke", help="work and result folder")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU is visible (use --cpu to run the stages on this CPU)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    for stale in ("train", "killed", "zero1", "zero2", "logs"):  # every run starts fresh; the data is kept
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    smoke = Smoke(out, CPU if args.cpu else GPU, device)
    started = time.perf_counter()
    first_failure = smoke.run([
        ("data", smoke.data, ()),
        ("train", smoke.train, ("data",)),
        ("resume", smoke.resume, ("train",)),
        ("eval", smoke.eval, ("train",)),
        ("export", smoke.export, ("train",)),
        ("zero_stages", smoke.zero_stages, ("train",)),
        ("bench", smoke.bench, ()),
    ])
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "seconds": round(time.perf_counter() - started, 1), "first_failure": first_failure,
              "stages": smoke.results}
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_smoke] {'FAILED at stage ' + first_failure if first_failure else 'all stages passed'} "
          f"in {report['seconds']} s; results in {out / 'gpu_smoke.json'}, logs in {out / 'logs'}")
    return 1 if first_failure else 0


if __name__ == "__main__":
    sys.exit(main())
