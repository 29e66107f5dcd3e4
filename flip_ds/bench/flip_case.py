"""flip-ds's own training step under the real DeepSpeed engine, as a benchmark case."""

from __future__ import annotations

import torch

from flip_ds.bench.cases import synchronize, timed
from flip_ds.bench.footprint import current_and_peak, held_bytes, reset_peak
from flip_ds.bench.random_batch import random_batch
from flip_ds.config import BatchSplit, Recipe, TrainConfig
from flip_ds.data.tokenizer import EOS_ID, PAD_ID
from flip_ds.engine import initialize, set_lr
from flip_ds.host_memory import release_freed_memory
from flip_ds.memory import saved_activation_bytes
from flip_ds.metrics import Stopwatch
from flip_ds.models.attention import resolve_attention, use_attention
from flip_ds.models.config import ModelConfig
from flip_ds.models.flip import build_model
from flip_ds.precision import dtype_of
from flip_ds.step import contrastive_step

BENCH_LR = 1e-5  # any lr > 0: AdamW then does its full update


class FlipEngine:
    """The FLIP model in a DeepSpeed engine at one ZeRO stage and precision, with a fixed synthetic
    batch per rank. Built, then stepped once (DeepSpeed and the optimizer allocate lazily), then
    its held memory is measured."""

    def __init__(self, model: ModelConfig, vocab_size: int, *, stage: int, precision: str, batch: int,
                 rank: int, world_size: int, device: str) -> None:
        self.model_cfg, self.stage, self.precision, self.batch = model, stage, precision, batch
        self.vocab_size, self.rank, self.device = vocab_size, rank, device
        self.dtype = dtype_of(precision)
        recipe = Recipe(model=model, train=TrainConfig(global_batch=batch * world_size, micro_batch=batch,
                                                       precision=precision, deepspeed=f"ds_configs/zero{stage}.json"))
        held_before = held_bytes(device)
        torch.manual_seed(0)  # every rank builds the same weights
        self.engine = initialize(build_model(model, vocab_size, pad_id=PAD_ID, eos_id=EOS_ID), recipe,
                                 BatchSplit(batch, 1), device, precision)
        set_lr(self.engine, BENCH_LR)
        self.images, self.tokens = self.batch_of(batch)
        self.step_count = 0
        self.watch = Stopwatch()
        self.step(0.0)
        synchronize(device)
        self.held_bytes = held_bytes(device) - held_before

    @property
    def label(self) -> str:
        return f"zero{self.stage} {self.precision}"

    def batch_of(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batch(batch, self.model_cfg.resolved_image_size, self.model_cfg.context_length,
                            self.vocab_size, seed=self.rank, device=self.device, dtype=self.dtype)

    def use_attention_for(self, mask: float, setting: str = "auto") -> None:
        """The attention path a training phase at image mask `mask` runs under `setting` (as the
        trainer sets it; 'auto' is the model's own setting)."""
        setting = self.model_cfg.attention if setting == "auto" else setting
        path = resolve_attention(setting, self.device, self.dtype, self.model_cfg.image_tokens(mask))
        use_attention(self.engine.module, path)

    def step(self, mask: float, micro_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        # a training step that does not log (9 in 10 at logging.every_steps 10): DeepSpeed's gradient
        # norm is then skipped where that gives nothing up (flip_ds.engine.want_grad_norm)
        contrastive_step(self.engine, [micro_batch or (self.images, self.tokens)], image_mask=mask, text_mask=0.0,
                         seed=0, rank=self.rank, step=self.step_count, device=self.device, stop_requested=False,
                         watch=self.watch, grad_norm=False)
        self.step_count += 1

    def activation_bytes(self, batch: int, mask: float) -> int:
        """Memory a training step at `batch` needs beyond the held state. GPU: the step's peak over
        what was allocated before it. CPU: the bytes autograd saves for backward (exact; the
        resident set's peak is blurred by the host allocator)."""
        micro = self.batch_of(batch)
        self.use_attention_for(mask)  # what a step saves depends on its attention path
        if self.device == "cuda":
            synchronize(self.device)
            reset_peak(self.device)
            before, _ = current_and_peak(self.device)
            self.step(mask, micro)
            synchronize(self.device)
            return current_and_peak(self.device)[1] - before
        generator = torch.Generator(device=self.device).manual_seed(self.step_count)
        _, saved = saved_activation_bytes(lambda: self.engine(*micro, mask, 0.0, generator),
                                          exclude=list(self.engine.module.parameters()))
        return saved

    def destroy(self) -> None:
        self.engine.destroy()
        del self.engine


class FlipStepCase:
    """One optimizer step of `engine` at image mask `mask` on attention `attention` ('auto': the
    trainer's path for the mask), on every rank. Also records the step's memory peak above the held
    state and the optimizer's share of the step."""

    def __init__(self, engine: FlipEngine, mask: float, attention: str = "auto") -> None:
        self.engine, self.mask, self.attention = engine, mask, attention
        self.setup = engine.label if attention == "auto" else f"{engine.label} {attention}"
        self.name = f"flip-ds {self.setup} mask {mask:g}"
        self.peak_rise = 0
        self.blocks_run = 0
        self.sections: dict[str, float] = {}

    def run_block(self, steps: int) -> float:
        device = self.engine.device
        # a CPU's resident set shows a step's rise only where the heap has no freed memory to reuse
        # (flip_ds.host_memory): measured on the first block, from a released heap
        measure_peak = device == "cuda" or self.blocks_run == 0
        if measure_peak and device == "cpu":
            release_freed_memory()
        synchronize(device)
        reset_peak(device)
        before, _ = current_and_peak(device)

        self.engine.use_attention_for(self.mask, self.attention)  # the cases share the engine: each sets its path

        def work() -> None:
            self.engine.watch.lap("between")  # the time before this block is no step's
            for _ in range(steps):
                self.engine.step(self.mask)

        seconds = timed(device, work, steps)
        if measure_peak:
            self.peak_rise = max(self.peak_rise, current_and_peak(device)[1] - before)
        self.blocks_run += 1
        for section, total in self.engine.watch.take().items():
            if section != "between":
                self.sections[section] = self.sections.get(section, 0.0) + total
        return seconds

    @property
    def optimizer_share(self) -> float:
        total = sum(self.sections.values())
        return self.sections.get("optimizer", 0.0) / total if total else 0.0
