"""The recipe: every component's config section, composed, loaded and validated.

Science lives here (batch, lr, phases, masking); the DeepSpeed JSON named by `train.deepspeed`
holds only the engine (ZeRO stage, offload, buckets). The engine fills DeepSpeed's batch,
precision and optimizer fields from the recipe, so nothing is kept in sync by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flip_ds.config_loader import apply_overrides, check, from_dict, read_yaml
from flip_ds.data.config import DataConfig
from flip_ds.evaluation.config import EvalConfig
from flip_ds.models.config import ModelConfig

IMAGENET_EPOCH = 1_281_167  # FLIP counts warmup in "virtual ImageNet epochs" of this many samples


@dataclass
class TrainConfig:
    global_batch: int = 65536  # contrastive batch: every sample is a negative for every other
    micro_batch: int = 256  # samples per device per forward
    accum_steps: int | None = None  # feature-cache micro batches per step; None: derived from the world size
    seed: int = 0
    # auto: bf16 on GPUs and CPUs with native bf16, fp32 on other CPUs (flip_ds.precision)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # engine settings only (ZeRO stage, offload, buckets); stage "auto": the lowest that fits (flip_ds.zero_auto)
    deepspeed: str = "ds_configs/zero_auto.json"
    max_nonfinite_steps: int = 5  # stop after this many steps in a row skipped for a non-finite loss or gradient
    comm_timeout_s: float = 600.0  # a collective waiting this long for a rank fails every rank (a hang ends)

    def validate(self, prefix: str = "train") -> None:
        check(self.global_batch > 0, f"{prefix}.global_batch: {self.global_batch} must be > 0")
        check(self.micro_batch > 0, f"{prefix}.micro_batch: {self.micro_batch} must be > 0")
        check(self.accum_steps is None or self.accum_steps > 0,
              f"{prefix}.accum_steps: {self.accum_steps} must be > 0 (or null to derive it)")
        check(self.max_nonfinite_steps > 0, f"{prefix}.max_nonfinite_steps: must be > 0")
        check(self.comm_timeout_s > 0, f"{prefix}.comm_timeout_s: {self.comm_timeout_s} must be > 0")

    def resolve_accum_steps(self, world_size: int, micro_batch: int | None = None) -> int:
        """Micro batches per step so that global = micro x accum x world (`micro_batch`: a phase's
        own, else train.micro_batch), or a ConfigError saying why not."""
        micro = micro_batch or self.micro_batch
        per_step = micro * world_size
        if self.accum_steps is not None:
            check(per_step * self.accum_steps == self.global_batch,
                  f"train.global_batch: {self.global_batch} != micro_batch {micro} x accum_steps "
                  f"{self.accum_steps} x world size {world_size} (= {per_step * self.accum_steps})")
            return self.accum_steps
        check(self.global_batch % per_step == 0,
              f"train.global_batch: {self.global_batch} is not a multiple of micro_batch {micro} x "
              f"world size {world_size} (= {per_step}); choose a global batch of k x {per_step}")
        return self.global_batch // per_step


@dataclass(frozen=True)
class BatchSplit:
    """How one step's global batch is cut on each rank: `accum` micro batches of `micro` samples."""

    micro: int
    accum: int


@dataclass
class OptimConfig:
    base_lr: float = 4e-6  # per 256 samples: lr = base_lr x global_batch / 256 (FLIP)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.2
    # which parameters weight decay spares (flip_ds.models.flip.decay_exempt): FLIP's rule spares
    # biases, norms and position embeddings; OpenCLIP's spares biases, norms, CLS and the logit scale
    no_decay: Literal["flip", "openclip"] = "flip"
    grad_clip: float = 0.0  # 0: no clipping (FLIP)

    def validate(self, prefix: str = "optim") -> None:
        check(self.base_lr > 0, f"{prefix}.base_lr: {self.base_lr} must be > 0")
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas: {self.betas} must be in [0, 1)")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay: {self.weight_decay} must be >= 0")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip: {self.grad_clip} must be >= 0")


@dataclass
class PhaseConfig:
    name: str
    # The phase's length, exactly one of: `samples` seen (steps: ceil(samples / global batch)), or
    # FLIP's virtual `epochs` (steps: epochs x (recipe.epoch_samples // global batch), FLIP's own
    # count, so 10,000 epochs at 64k are its 190,000 steps). Recipe.validate turns epochs into samples.
    samples: int | None = None
    epochs: int | None = None
    mask_ratio: float = 0.5  # share of image patches dropped
    text_mask_ratio: float = 0.0
    # samples per device per forward in this phase (a masked phase fits about twice the unmasked
    # one in the same memory, and more per forward means fewer feature-cache re-forwards); None: train.micro_batch
    micro_batch: int | None = None
    base_lr: float | None = None  # per 256 samples; None: optim.base_lr
    warmup_samples: int = 0  # linear warmup, then cosine to zero over the rest of the phase
    warmup_epochs: int = 0  # the same in virtual epochs, for a phase given in epochs
    reset_optimizer: bool = False  # drop Adam's moments at the start of this phase (FLIP's unmasked tuning)

    def validate(self, prefix: str = "phase") -> None:
        self._validate_length(prefix)
        check(0.0 <= self.mask_ratio < 1.0, f"{prefix}.mask_ratio: {self.mask_ratio} is outside [0, 1)")
        check(0.0 <= self.text_mask_ratio < 1.0, f"{prefix}.text_mask_ratio: {self.text_mask_ratio} is outside [0, 1)")
        check(self.base_lr is None or self.base_lr > 0, f"{prefix}.base_lr: {self.base_lr} must be > 0")
        check(self.micro_batch is None or self.micro_batch > 0, f"{prefix}.micro_batch: {self.micro_batch} must be > 0")

    def _validate_length(self, prefix: str) -> None:
        """Exactly one of samples / epochs, with its own kind of warmup."""
        check((self.samples is None) != (self.epochs is None),
              f"{prefix}: give the phase's length as samples or as epochs, exactly one "
              f"(got samples={self.samples}, epochs={self.epochs})")
        if self.samples is not None:
            check(self.samples > 0, f"{prefix}.samples: {self.samples} must be > 0")
            check(self.warmup_epochs == 0,
                  f"{prefix}.warmup_epochs: a phase given in samples takes warmup_samples, not warmup_epochs")
            check(0 <= self.warmup_samples <= self.samples,
                  f"{prefix}.warmup_samples: {self.warmup_samples} must be in [0, samples={self.samples}]")
        else:
            check(self.epochs > 0, f"{prefix}.epochs: {self.epochs} must be > 0")
            check(self.warmup_samples == 0,
                  f"{prefix}.warmup_samples: a phase given in epochs takes warmup_epochs, not warmup_samples")
            check(0 <= self.warmup_epochs <= self.epochs,
                  f"{prefix}.warmup_epochs: {self.warmup_epochs} must be in [0, epochs={self.epochs}]")


@dataclass
class CheckpointConfig:
    every_samples: int = 0  # 0: only at phase ends, on signals and at the end
    keep_last: int = 2  # older periodic checkpoints are deleted; phase ends and milestones are kept
    milestones: list[int] = field(default_factory=list)  # samples seen at which a kept checkpoint is written

    def validate(self, prefix: str = "checkpoint") -> None:
        check(self.every_samples >= 0, f"{prefix}.every_samples: {self.every_samples} must be >= 0")
        check(self.keep_last >= 1, f"{prefix}.keep_last: {self.keep_last} must be >= 1")


@dataclass
class LoggingConfig:
    every_steps: int = 10  # console line and TensorBoard scalars
    peak_tflops: float | None = None  # per device, for MFU; None: a built-in table by device name
    masked_image_grid: bool = True  # a grid of masked inputs in TensorBoard when a phase starts

    def validate(self, prefix: str = "logging") -> None:
        check(self.every_steps >= 1, f"{prefix}.every_steps: {self.every_steps} must be >= 1")


@dataclass
class Recipe:
    output_dir: str = "runs/flip"  # checkpoints/, tensorboard/ and eval/ go below it
    resume: str = "auto"  # 'auto': newest complete checkpoint in output_dir, 'none', or a checkpoint path
    # weights only (a checkpoint or an exported file) for a run that starts fresh: its own schedule,
    # optimizer and data; ignored once the run has a checkpoint of its own to resume
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # samples in one virtual epoch of phases[].epochs (FLIP's samples_per_epoch: ImageNet-1k's train set)
    epoch_samples: int = IMAGENET_EPOCH
    phases: list[PhaseConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, prefix: str = "") -> None:
        check(len(self.phases) > 0, "phases: a recipe needs at least one phase (e.g. {name: pretrain, samples: ...})")
        for i, phase in enumerate(self.phases):
            phase.validate(f"phases.{i}")
        names = [p.name for p in self.phases]
        check(len(names) == len(set(names)), f"phases: names must be unique, got {names}")
        check(self.epoch_samples > 0, f"epoch_samples: {self.epoch_samples} must be > 0")
        self._epochs_to_samples()

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one virtual epoch, counted as FLIP counts them (train.py's
        samples_per_epoch // batch_size): whole global batches only, 1281167 // 65536 = 19."""
        return self.epoch_samples // self.train.global_batch

    def _epochs_to_samples(self) -> None:
        """Rewrite every phase given in epochs as the samples of its whole steps, once the global
        batch and epoch size are final: everything downstream (the schedule, checkpoint and eval
        cadence, the planner) counts samples, and the recipe.yaml a checkpoint saves reloads to the
        same steps."""
        g = self.train.global_batch
        for i, phase in enumerate(self.phases):
            if phase.epochs is None:
                continue
            check(self.steps_per_epoch >= 1,
                  f"phases.{i}.epochs: an epoch of epoch_samples={self.epoch_samples} is less than one global "
                  f"batch ({g}); give this phase in samples")
            phase.samples = phase.epochs * self.steps_per_epoch * g
            phase.warmup_samples = phase.warmup_epochs * self.steps_per_epoch * g
            phase.epochs, phase.warmup_epochs = None, 0

    @property
    def total_samples(self) -> int:
        return sum(p.samples for p in self.phases)

    def validate_world(self, world_size: int) -> list[BatchSplit]:
        """Check the batch split for `world_size` ranks; returns each phase's."""
        splits = []
        for i, phase in enumerate(self.phases):
            check(phase.samples >= self.train.global_batch,
                  f"phases.{i}.samples: {phase.samples} is less than one global batch ({self.train.global_batch})")
            check(phase.micro_batch is None or self.train.accum_steps is None,
                  f"phases.{i}.micro_batch: a phase's own micro batch needs derived accumulation "
                  "(train.accum_steps: null)")
            micro = phase.micro_batch or self.train.micro_batch
            splits.append(BatchSplit(micro, self.train.resolve_accum_steps(world_size, micro)))
        return splits


def load_recipe(path: str | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or only defaults when `path` is None) and apply dotted overrides."""
    tree = read_yaml(path) if path else {}
    tree = apply_overrides(tree, overrides or [])
    return from_dict(Recipe, tree)
