"""The training loop: phases of masked contrastive steps, logged, checkpointed, resumable."""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flip_ds import checkpoint, distributed, run_dir
from flip_ds import engine as ds_engine
from flip_ds.config import BatchSplit, Recipe
from flip_ds.config_loader import ConfigError, UsageError
from flip_ds.data.pipeline import DataError, TrainStream
from flip_ds.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from flip_ds.data.transforms import denormalize, normalize
from flip_ds.distributed import DistEnv, all_gather_object, all_reduce, detect_dist_env, init_distributed, shutdown
from flip_ds.engine_config import validate_for_launch
from flip_ds.log import setup_logging
from flip_ds.metrics import CaptionRepeats, Stopwatch, TrainLogger, device_peak_tflops, format_eta, peak_memory_bytes
from flip_ds.models.attention import AttentionPath, resolve_attention, use_attention
from flip_ds.models.flip import build_model
from flip_ds.models.flops import flops_per_sample
from flip_ds.models.vision import masked_preview
from flip_ds.precision import Precision, resolve_on_all_ranks
from flip_ds.schedule import PhasePlan, PhaseSpan
from flip_ds.signals import StopRequest
from flip_ds.step import contrastive_step, mask_seed

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; requeue me
# The recipe or the data is wrong, or the loss diverged: a rerun would fail the same way, so the
# SLURM template never requeues it (any other failure, a crash or a hang, it does).
EXIT_RECIPE_OR_DATA = 2


@dataclass
class TrainState:
    """What a checkpoint must hold besides the weights and optimizer for an exact resume.

    There are no RNG states: masking noise and the data stream are derived from
    (seed, rank, step or stream position), so they are reproduced rather than restored.
    """

    step: int = 0  # the next optimizer step to run
    phase: int = -1  # the phase the last step ran in (-1: none yet)
    nonfinite_skipped: int = 0
    data: dict[str, Any] | None = None  # this rank's data-stream position
    # The data streams' seed: the recipe's, until a resume on another world size starts new
    # streams, seeded by the samples seen then so that they do not replay the first ones.
    data_seed: int | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    # The training loop's wall clock up to the last checkpoint, summed over restarts (start-up and
    # the steps lost to an interruption are not in it): the time and device-hours a run cost
    train_seconds: float = 0.0


def train(recipe: Recipe) -> int:
    denv = detect_dist_env()
    setup_logging(denv.rank, denv.world_size)
    splits = validate_for_launch(recipe, denv.world_size)
    distributed.quiet_deepspeed()
    _check_inputs(recipe)
    if recipe.resume == "auto" and run_dir.state(recipe) == "done":  # a chained or repeated job: nothing to do
        log.info(f"{recipe.output_dir} is complete ({run_dir.total_samples(recipe)} samples trained and evaluated); "
                 "nothing to do")
        return 0
    device = init_distributed(denv, recipe.train.comm_timeout_s)
    try:
        status = Trainer(recipe, denv, splits, device).run()
    except (UsageError, DataError, NonFiniteError) as e:
        print(f"flip-ds: error (rank {denv.rank}): {e}", file=sys.stderr)
        status = EXIT_RECIPE_OR_DATA
    gc.collect()  # the trainer's DeepSpeed objects go before the process group does (Trainer.run)
    shutdown()
    return status


def _check_inputs(recipe: Recipe) -> None:
    if not recipe.data.train:
        raise ConfigError("data.train: no training shards; add e.g. [{shards: /data/laion/{00000..41407}.tar}]")
    if not Path(recipe.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: '{recipe.data.tokenizer}' does not exist (make one with "
                          "`flip-ds train-tokenizer`)")
    try:
        Tokenizer(recipe.data.tokenizer, recipe.model.context_length)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if recipe.eval.sets:  # a wrong eval path fails now, not hours into the run
        from flip_ds.evaluation.runner import check_sets

        check_sets(recipe.eval.sets)


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, recipe: Recipe, denv: DistEnv, splits: list[BatchSplit], device: str) -> None:
        self.recipe, self.denv, self.splits, self.device = recipe, denv, splits, device
        # The stream's batch: every phase's micro batch is a whole number of them
        self.unit = math.gcd(*(s.micro for s in splits))
        self.rank = denv.rank
        self.out = Path(recipe.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.plan = PhasePlan(recipe.phases, recipe.optim, recipe.train.global_batch)
        self.tokenizer = Tokenizer(recipe.data.tokenizer, recipe.model.context_length)
        self.precision = self._choose_precision()
        self.dtype = self.precision.dtype
        torch.manual_seed(recipe.train.seed)  # every rank builds the same initial weights
        model = build_model(recipe.model, self.tokenizer.vocab_size, pad_id=PAD_ID, eos_id=EOS_ID)
        resume = checkpoint.find_resume(recipe, self.ckpt_root)
        if recipe.init_from and not resume:
            self._init_weights(model, recipe.init_from)
        saved_world = checkpoint.read_meta(*resume)["world_size"] if resume else denv.world_size
        resharded = saved_world != denv.world_size
        if resume and resharded:
            resume = checkpoint.universal_copy(*resume, self.rank)
        self.split = splits[0]  # the engine's micro batch and accumulation now
        self.attention: AttentionPath = "sdpa"  # the attention path now (set per phase by _configure_for)
        self.engine = ds_engine.initialize(model, recipe, self.split, device, self.precision.name,
                                           load_universal=resharded)
        self.data_cfg = recipe.data.with_workers(denv.local_world_size)
        log.info(f"layout: {denv.world_size} rank(s) ({device}) x {torch.get_num_threads()} thread(s), "
                 f"{self.data_cfg.workers} data loader worker(s) per rank; ZeRO stage "
                 f"{self.engine.zero_optimization_stage()}")
        self.state = TrainState()
        if resume:
            self.state = self._load(resume, saved_world)
        self.stream = TrainStream(self.data_cfg, tokenizer_file=recipe.data.tokenizer,
                                  context_length=recipe.model.context_length,
                                  image_size=recipe.model.resolved_image_size, batch_size=self.unit,
                                  seed=recipe.train.seed if self.state.data_seed is None else self.state.data_seed,
                                  rank=self.rank, world_size=denv.world_size, state=self.state.data)
        self.logger = TrainLogger(self.out / "tensorboard", self.rank)
        self.duplicates = CaptionRepeats()  # batches made of one caption cannot train: warn, count
        self.logger.text("run/precision", f"{self.precision.name}: {self.precision.reason}", 0)
        self.peak_tflops = device_peak_tflops(device, recipe.logging.peak_tflops)
        self.stop = StopRequest()
        self.clock_start, self.seconds_before = time.perf_counter(), self.state.train_seconds

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        r, g = self.recipe, self.recipe.train.global_batch
        self.stop.install()
        batches = iter(self.stream)
        watch = Stopwatch()
        window_start, window_steps, nonfinite_in_row = time.perf_counter(), 0, 0
        last_saved = self.state.step if self.state.step > 0 else -1
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        cut = " or ".join(dict.fromkeys(f"{s.micro} x {s.accum} accum" for s in self.splits))
        log.info(f"training {r.model.name} on {self.denv.world_size} rank(s) ({self.device}, {self.precision.name}): "
                 f"global batch {g} = {cut} x {self.denv.world_size}; "
                 f"{self.plan.total_steps} steps, {len(self.plan.spans)} phase(s)")
        try:
            configured_for = None
            for step in range(self.state.step, self.plan.total_steps):
                span = self.plan.span_at(step)
                if span.index != configured_for:  # a phase's own micro batch and attention path
                    self._configure_for(span)
                    configured_for = span.index
                split = self.splits[span.index]
                data_state = self.stream.state_dict()  # position before this step's batches
                watch.lap("other")
                try:
                    micro, data_error = self._micro_batches(batches, split), None
                except DataError as e:  # this rank's data failed; the others learn it at the step's agreement
                    micro, data_error = self._placeholder_batches(split), e
                watch.lap("data_wait")
                if span.index != self.state.phase:
                    self._start_phase(span, step, micro[0][0])
                lr = self.plan.lr_at(step)
                ds_engine.set_lr(self.engine, lr)
                logs = (step + 1) % r.logging.every_steps == 0 or step + 1 == self.plan.total_steps
                outcome = contrastive_step(self.engine, micro, image_mask=span.phase.mask_ratio,
                                           text_mask=span.phase.text_mask_ratio, seed=r.train.seed, rank=self.rank,
                                           step=step, device=self.device, stop_requested=self.stop.requested,
                                           abort_requested=data_error is not None, watch=watch, grad_norm=logs)
                if outcome.abort:
                    raise data_error or DataError("another rank stopped on a data error (see its message)")
                if outcome.stop:  # a stop request on any rank: every rank saves and exits 75
                    self.stop.stopping = True
                    self.state.step, self.state.data = step, data_state
                    self._save(step)
                    cause = f"signal {self.stop.signum}" if self.stop.requested else "another rank's signal"
                    log.info(f"stopped by {cause} at step {step}; checkpoint saved, "
                             f"exiting {EXIT_PREEMPTED} for a requeue")
                    return EXIT_PREEMPTED
                skipped = outcome.nonfinite or outcome.nonfinite_grad
                nonfinite_in_row = nonfinite_in_row + 1 if skipped else 0
                if skipped:
                    self.state.nonfinite_skipped += 1
                    what = "loss" if outcome.nonfinite else "gradient (finite loss)"
                    log.info(f"step {step}: non-finite {what}, step skipped ({nonfinite_in_row} in a row)")
                    if nonfinite_in_row >= r.train.max_nonfinite_steps:
                        raise NonFiniteError(f"{nonfinite_in_row} steps in a row with a non-finite loss or gradient "
                                             f"at step {step}; lower the lr or check the data "
                                             "(train.max_nonfinite_steps)")
                self.state.step, self.state.data = step + 1, self.stream.state_dict()
                window_steps += 1
                if logs:
                    self._report(step, span, lr, outcome, watch, time.perf_counter() - window_start, window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                if self._eval_due(step):
                    self._evaluate(step + 1)
                if self._checkpoint_due(step, span):
                    self._save(step + 1)
                    last_saved = step + 1
            if last_saved != self.plan.total_steps:
                self._save(self.plan.total_steps)
            if r.eval.at_end and r.eval.sets and not self._eval_due(self.plan.total_steps - 1):
                self._evaluate(self.plan.total_steps)
            log.info(f"done: {self.plan.total_steps * g} samples; checkpoints in {self.ckpt_root}"
                     + (f", evaluations in {self.out / 'eval'}" if r.eval.sets else ""))
            return 0
        finally:
            self.stop.uninstall()
            self.stream.close()
            self.logger.close()
            # DeepSpeed's engine holds the process group's ZeRO work (hooks, gather handles): freed
            # here, while the group is alive, their teardown stays out of interpreter exit, where
            # gloo's threads can abort a rank that has finished ("terminate called without an
            # active exception", seen on the 2-node SLURM test)
            self.engine.destroy()

    # -- pieces ---------------------------------------------------------------------------------
    def _init_weights(self, model: torch.nn.Module, source: str) -> None:
        ckpt = checkpoint.read_checkpoint(source)
        try:
            model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as e:  # another model or vocabulary
            raise ConfigError(f"init_from: '{source}' does not fit this recipe's model "
                              f"({self.recipe.model.name}, vocabulary {self.tokenizer.vocab_size}): "
                              f"{' '.join(str(e).split())[:300]}") from None
        log.info(f"initialised from the weights of {ckpt.source} ({ckpt.meta.get('samples_seen', '?')} samples "
                 "seen there); a fresh schedule, optimizer and data stream")

    def _load(self, resume: tuple[Path, str], saved_world: int) -> TrainState:
        """Weights, optimizer and loop state from checkpoint `resume`. On another world size or
        number of loader workers the data streams start anew: a stream position belongs to one
        (rank, worker) of the run that saved it."""
        client = ds_engine.load_checkpoint(self.engine, str(resume[0]), resume[1])
        saved = client["flip_ds"]
        samples = saved["step"] * self.recipe.train.global_batch
        log.info(f"resumed from {resume[0] / resume[1]} at step {saved['step']} ({samples} samples)")
        changed = []
        if saved_world != self.denv.world_size:
            changed.append(f"world size changed from {saved_world} to {self.denv.world_size} ranks (weights and "
                           "optimizer state resharded through DeepSpeed's universal checkpoint)")
        elif saved["data"][self.rank]["workers"] != max(self.data_cfg.workers, 1):
            changed.append(f"data.workers changed from {saved['data'][self.rank]['workers']} to "
                           f"{self.data_cfg.workers}")
        if any(distributed.any_rank(bool(changed))):  # every rank restarts its streams, or none does
            data_seed = int(np.random.SeedSequence([self.recipe.train.seed, samples]).generate_state(1)[0])
            log.info(f"{'; '.join(changed) or 'another rank saw a change'}: the data streams start anew, seeded by "
                     f"the {samples} samples seen (data seed {data_seed}), so the sample order differs from an "
                     "uninterrupted run's")
            return TrainState(**{**saved, "data": None, "data_seed": data_seed})
        return TrainState(**{**saved, "data": saved["data"][self.rank]})

    def _choose_precision(self) -> Precision:
        precision = resolve_on_all_ranks(self.recipe.train.precision, self.device)
        log.info(f"precision {precision.name} ({precision.reason})")
        if precision.warning and self.rank == 0:  # every rank measured the same: said once
            log.warning(precision.warning)
        return precision

    def _micro_batches(self, batches, split: BatchSplit) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of one step: `split.accum` micro batches, each of whole stream batches."""
        per_micro = split.micro // self.unit
        out = []
        for _ in range(split.accum):
            parts = [next(batches) for _ in range(per_micro)]
            images = torch.cat([p.images for p in parts]) if per_micro > 1 else parts[0].images
            tokens = torch.cat([p.tokens for p in parts]) if per_micro > 1 else parts[0].tokens
            self.duplicates.observe(tokens)
            images = normalize(images.to(self.device, non_blocking=True), self.dtype)  # uint8 until on the device
            out.append((images, tokens.to(self.device, non_blocking=True)))
        return out

    def _placeholder_batches(self, split: BatchSplit) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stand-in batches for a rank whose data failed: it takes part in the step's collectives
        (forward included) so that every rank reaches the agreement that aborts the run."""
        size = self.recipe.model.resolved_image_size
        images = torch.zeros(split.micro, 3, size, size, device=self.device, dtype=self.dtype)
        tokens = torch.full((split.micro, self.recipe.model.context_length), PAD_ID, device=self.device)
        tokens[:, 0], tokens[:, 1] = BOS_ID, EOS_ID
        return [(images, tokens)] * split.accum

    def _configure_for(self, span: PhaseSpan) -> None:
        """The engine's batch split and the model's attention path for `span`'s phase."""
        split = self.splits[span.index]
        if split != self.split:
            ds_engine.set_batch_split(self.engine, split, self.recipe.train.global_batch)
            self.split = split
        model = self.recipe.model
        self.attention = resolve_attention(model.attention, self.device, self.dtype,
                                           model.image_tokens(span.phase.mask_ratio))
        use_attention(self.engine.module, self.attention)

    def _start_phase(self, span: PhaseSpan, step: int, images: torch.Tensor) -> None:
        samples = step * self.recipe.train.global_batch
        reset = span.phase.reset_optimizer and step == span.first_step and self.state.phase >= 0
        if reset:
            ds_engine.reset_optimizer_state(self.engine)
        split = self.splits[span.index]
        log.info(f"phase {span.index} '{span.phase.name}' starts at step {step} ({samples} samples): mask "
                 f"{span.phase.mask_ratio}, micro batch {split.micro} x {split.accum} accum, peak lr "
                 f"{span.peak_lr:.3g}, {span.steps} steps"
                 + (", optimizer state reset" if reset else ""))
        self.logger.text("train/phase", f"{span.phase.name} from step {step}", samples)
        if self.recipe.logging.masked_image_grid:
            from torchvision.utils import make_grid

            generator = torch.Generator().manual_seed(mask_seed(self.recipe.train.seed, self.rank, step, 0))
            shown = masked_preview(denormalize(images[:8]).cpu(), self.recipe.model.sizes.patch_size,
                                   span.phase.mask_ratio, generator)
            self.logger.image(f"inputs/{span.phase.name}", make_grid(shown.clamp(0, 1), nrow=4), samples)
        self.state.phase = span.index

    def _report(self, step: int, span: PhaseSpan, lr: float, outcome, watch: Stopwatch, seconds: float,
                steps: int) -> None:
        r, g = self.recipe, self.recipe.train.global_batch
        samples = (step + 1) * g
        per_s = steps * g / max(seconds, 1e-9)
        per_device = per_s / self.denv.world_size
        tflops = flops_per_sample(r.model, span.phase.mask_ratio).train * per_device / 1e12
        times = {k: v / steps for k, v in watch.take().items()}
        skips, duplicates = self._global_skip_counts()
        grad_norm = self.engine.get_global_grad_norm() if outcome.stepped else None  # else an earlier step's
        scalars = {
            "train/loss": outcome.loss, "train/lr": lr, "train/temperature": outcome.temperature,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/samples_seen": samples, "train/phase": span.index, "train/mask_ratio": span.phase.mask_ratio,
            "train/nonfinite_skipped": self.state.nonfinite_skipped,
            "perf/samples_per_s": per_s, "perf/samples_per_s_per_device": per_device,
            "perf/tflops_per_device": tflops, "memory/peak_gb": peak_memory_bytes(self.device) / 2**30,
            **{f"time/{k}_s": v for k, v in times.items()},
            **{f"data/{k}": v for k, v in skips.items()}, **CaptionRepeats.scalars(duplicates),
        }
        if self.peak_tflops:
            scalars["perf/mfu"] = tflops / self.peak_tflops
        self.logger.scalars(scalars, samples)
        warning = self.duplicates.warning(duplicates)
        if warning and self.rank == 0:  # counts summed over ranks: said once
            log.warning(warning)
        eta = (self.plan.total_steps - step - 1) * g / max(per_s, 1e-9)
        log.info(f"{span.phase.name} | step {step + 1}/{self.plan.total_steps} | samples {samples} "
                 f"({100 * samples / (self.plan.total_steps * g):.1f}%) | loss {outcome.loss:.4f} | lr {lr:.3g} | "
                 f"tau {outcome.temperature:.4f} | {per_s:.1f} samples/s | ETA {format_eta(eta)}")

    def _global_skip_counts(self) -> tuple[dict[str, int], list[float]]:
        """Skipped-sample counts summed over ranks, and the window's duplicate-caption counts (in the
        same all-reduce); stops every rank together above the skip rate."""
        counts = self.stream.skip_counts()
        duplicates = self.duplicates.take()
        try:
            self.stream.check_skip_rate()
            error = ""
        except DataError as e:
            error = str(e)
        keys = sorted(counts)
        # float64: float32 counts would stop being exact past 2^24 samples read
        totals = all_reduce(torch.tensor([float(counts[k]) for k in keys] + duplicates + [float(bool(error))],
                                        dtype=torch.float64))
        if totals[-1] > 0:
            raise DataError(error or "another rank exceeded data.max_skip_rate (see its error)")
        return ({k: int(v) for k, v in zip(keys, totals[:len(keys)].tolist())},
                totals[len(keys):-1].tolist())

    def _checkpoint_due(self, step: int, span: PhaseSpan) -> bool:
        g, c = self.recipe.train.global_batch, self.recipe.checkpoint
        before, after = step * g, (step + 1) * g
        periodic = c.every_samples > 0 and before // c.every_samples != after // c.every_samples
        milestone = any(before < m <= after for m in c.milestones)
        phase_end = step + 1 == span.first_step + span.steps
        return periodic or milestone or phase_end

    def _eval_due(self, step: int) -> bool:
        every = self.recipe.eval.every_samples
        g = self.recipe.train.global_batch
        return bool(self.recipe.eval.sets) and every > 0 and (step * g) // every != ((step + 1) * g) // every

    def _train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.clock_start

    def _save(self, step: int) -> None:
        g = self.recipe.train.global_batch
        self.state.train_seconds = self._train_seconds()
        meta = {"samples_seen": step * g, "step": step, "phase": self.plan.span_at(max(step - 1, 0)).phase.name,
                "world_size": self.denv.world_size, "model": self.recipe.model.name, "precision": self.precision.name,
                "precision_reason": self.precision.reason, "time": time.time()}
        # Every rank's data position travels in the client state, indexed by rank: under ZeRO-1/2
        # DeepSpeed writes the client state from rank 0 only, and every rank reads that one copy.
        client = {"flip_ds": {**self.state.__dict__, "data": all_gather_object(self.state.data)}}
        path = checkpoint.save(self.engine, self.ckpt_root, step, client, self.recipe, self.recipe.data.tokenizer,
                               meta, self.rank)
        kept = checkpoint.kept_tags(g, self.recipe.checkpoint.milestones,
                                    [span.first_step + span.steps for span in self.plan.spans])
        if self.rank == 0:
            checkpoint.prune(self.ckpt_root, self.recipe.checkpoint.keep_last, kept)
        log.info(f"checkpoint {path} ({step * g} samples)")

    def _evaluate(self, steps_done: int) -> None:
        from flip_ds.evaluation.runner import evaluate

        samples = steps_done * self.recipe.train.global_batch
        self.engine.eval()
        use_attention(self.engine.module, "sdpa")  # forward only: nothing for the eager path to gain
        results = evaluate(self.engine.module, self.recipe.eval.sets, self.tokenizer,
                           self.recipe.model.resolved_image_size, self.device, self.dtype)
        use_attention(self.engine.module, self.attention)
        self.engine.train()
        for name, metrics in results.items():
            self.logger.scalars({f"eval/{name}/{k}": v for k, v in metrics.items()}, samples)
            best = self.state.eval.setdefault("best", {}).setdefault(name, {})
            for k, v in metrics.items():
                best[k] = max(v, best.get(k, v))
        self.state.eval["latest"] = {"samples": samples, **results}
        log.info(f"eval at {samples} samples: {json.dumps(results)}")
        if self.rank == 0:
            self._write_eval(steps_done, results)

    def _write_eval(self, steps_done: int, results: dict[str, dict[str, float]]) -> None:
        """One JSON per evaluation, what `flip-ds report` reads: the metrics with the samples,
        time and devices they cost."""
        kinds = {s.name: s.kind for s in self.recipe.eval.sets}
        record = {"samples_seen": steps_done * self.recipe.train.global_batch, "step": steps_done,
                  "total_samples": self.plan.total_steps * self.recipe.train.global_batch,
                  "train_seconds": round(self._train_seconds(), 3), "world_size": self.denv.world_size,
                  "device": self.device, "precision": self.precision.name, "model": self.recipe.model.name,
                  "sets": {name: {"kind": kinds[name], "metrics": metrics} for name, metrics in results.items()}}
        path = run_dir.eval_record(self.out, steps_done * self.recipe.train.global_batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(path, json.dumps(record, indent=2))

