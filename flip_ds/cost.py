"""The planner's clock: how long a recipe's samples take on N GPUs, as a range with its parts.

Per optimizer step and GPU:

- compute: the work the GPU does (model FLOPs: 3x the forward, plus one more forward for the
  feature cache's no-grad pass when accumulation > 1 and one for activation recomputation) over
  peak x efficiency. The efficiency range defaults to what published CLIP runs reached (MFU_LOW,
  MFU_HIGH below): planning at a hoped-for 40% is how runs overshoot their allocation.
- communication: ZeRO's gradient reduce-scatters and parameter all-gathers and the contrastive
  loss's embedding gathers, in bytes each GPU sends, over the stated bandwidth (NVLink within a
  node; the per-GPU network share across nodes). DeepSpeed overlaps part of it with compute: the
  fast end of the range assumes all of it hidden, the slow end none.

Around the steps: evaluations (a forward over ImageNet-sized sets), checkpoint writes, restarts
of time-limited jobs, and failures (each costs a restart and, on average, half the work since the
last checkpoint) at a stated rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flip_ds.config import Recipe
from flip_ds.config_loader import check_flag
from flip_ds.models.flops import flops_per_sample, transformer_forward_flops

A100_BF16_TFLOPS = 312.0
H100_BF16_TFLOPS = 989.0


def _openclip_h14_mfu() -> float:
    """OpenCLIP's ViT-H/14 on LAION-2B: 824 A100s at about 34,600 samples/s, 381.7 forward GFLOPs
    per pair at 77 text tokens (OpenCLIP's model profile), train = 3x forward."""
    return 34_600 * 3 * 381.7e9 / (824 * A100_BF16_TFLOPS * 1e12)


def _nemo_g14_mfu() -> float:
    """NVIDIA NeMo's CLIP ViT-g/14: about 117 samples/s per H100. Image tower 1408 wide, 40 deep,
    MLP 6144, 257 tokens; text 1024 wide, 24 deep, 77 tokens."""
    image = transformer_forward_flops(257, 1408, 40, 6144 / 1408) + 2 * 256 * 3 * 14 * 14 * 1408
    text = transformer_forward_flops(77, 1024, 24, 4.0)
    return 117 * 3 * (image + text) / (H100_BF16_TFLOPS * 1e12)


MFU_LOW = round(_openclip_h14_mfu(), 3)  # 0.154
MFU_HIGH = round(_nemo_g14_mfu(), 3)  # 0.206
# Bytes per second each GPU sends in a collective. Within an H100 node NCCL's all-reduce bus
# bandwidth over NVLink 4 measures about 360-480 GB/s; across nodes one 400 Gb/s NDR port per GPU
# gives 50 GB/s at line rate, about 40 after protocol overheads.
INTRA_NODE_GBPS = 360.0
INTER_NODE_GBPS = 40.0
# Interruptions: Llama 3's 16,384 H100s saw 419 unexpected ones in 54 days.
FAILURES_PER_GPU_DAY = 419 / (54 * 16_384)


@dataclass(frozen=True)
class Setting:
    """What the clock assumes about the machine and the job, each with a default and a flag."""

    peak_tflops: float = H100_BF16_TFLOPS
    mfu: tuple[float, float] = (MFU_LOW, MFU_HIGH)  # slow and fast end
    intra_node_gbps: float = INTRA_NODE_GBPS
    inter_node_gbps: float = INTER_NODE_GBPS
    checkpoint_write_gbps: float = 10.0  # the whole job's write bandwidth to the checkpoint file system
    job_hours: float = 24.0  # the partition's time limit: every job end is a restart
    restart_s: float = 600.0  # requeue wait, start-up, checkpoint load, data workers warming up
    failures_per_gpu_day: float = FAILURES_PER_GPU_DAY
    eval_images: int = 50_000  # per evaluation set (ImageNet val)
    eval_texts: int = 80_000  # per evaluation set (1000 classes x 80 templates)

    def validate(self) -> None:
        """The planner's command-line flags: a wrong one is the user's input (UsageError)."""
        check_flag(self.peak_tflops > 0, f"--tflops: {self.peak_tflops} must be > 0")
        check_flag(0 < self.mfu[0] <= self.mfu[1] <= 1, f"--mfu: {self.mfu} must be LOW HIGH with 0 < LOW <= HIGH <= 1")
        for flag, value in (("--intra-node-gbps", self.intra_node_gbps), ("--inter-node-gbps", self.inter_node_gbps),
                            ("--checkpoint-write-gbps", self.checkpoint_write_gbps), ("--job-hours", self.job_hours)):
            check_flag(value > 0, f"{flag}: {value} must be > 0")
        check_flag(self.restart_s >= 0 and self.failures_per_gpu_day >= 0,
                   "--restart-s and --failures-per-gpu-day must be >= 0")

    def bandwidth(self, gpus: int, gpus_per_node: int) -> float:
        """Bytes/s per GPU of a collective spanning all GPUs: the network's when they span nodes."""
        return (self.intra_node_gbps if gpus <= gpus_per_node else self.inter_node_gbps) * 1e9


def step_bytes_sent(params: int, zero_stage: int, accum: int, global_batch: int, embed_dim: int, world: int,
                    act_bytes: int) -> dict[str, float]:
    """Bytes one GPU sends per optimizer step, by collective (ring algorithms: (n-1)/n of the data).

    ZeRO-1 reduce-scatters the gradients once per step and all-gathers the updated weights; ZeRO-2
    reduce-scatters after every micro batch's backward; ZeRO-3 also all-gathers the weights for
    every forward and backward (and the feature cache's no-grad forward), and needs no weight
    gather after the step. The loss all-gathers both towers' embeddings for every loss it
    computes (the cached pass and each micro batch) and all-reduces their gradient per backward.
    """
    share = (world - 1) / world
    weights = params * act_bytes * share
    forwards = 2 * accum if accum > 1 else 1  # the feature cache forwards every micro batch twice
    if zero_stage <= 1:
        zero = {"gradient reduce-scatter": weights, "weight all-gather": weights}
    elif zero_stage == 2:
        zero = {"gradient reduce-scatter": accum * weights, "weight all-gather": weights}
    else:  # gathered for every forward and every backward
        zero = {"gradient reduce-scatter": accum * weights, "weight all-gather": (forwards + accum) * weights}
    embeddings = 2 * global_batch * embed_dim * act_bytes * share
    losses = 1 + accum if accum > 1 else 1
    return {**zero, "embedding all-gather": losses * embeddings,
            "embedding-gradient all-reduce": 2 * accum * embeddings}


@dataclass(frozen=True)
class PhaseClock:
    name: str
    steps: int
    compute_s: tuple[float, float]  # per step, slow and fast end of the efficiency range
    communication_s: float  # per step, at the stated bandwidth
    bytes_sent: dict[str, float]  # per step and GPU

    @property
    def hours(self) -> tuple[float, float]:
        """(slow, fast): no communication hidden at the slow efficiency; all of it at the fast one."""
        slow = self.steps * (self.compute_s[0] + self.communication_s) / 3600
        fast = self.steps * max(self.compute_s[1], self.communication_s) / 3600
        return slow, fast


@dataclass(frozen=True)
class Overheads:
    """Time outside the training steps at one end of the range."""

    eval_hours: float
    checkpoint_hours: float
    time_limit_restarts: int
    failures: float  # expected
    restart_hours: float  # every restart's start-up, plus half a checkpoint interval lost per failure

    @property
    def hours(self) -> float:
        return self.eval_hours + self.checkpoint_hours + self.restart_hours


@dataclass(frozen=True)
class Clock:
    phases: list[PhaseClock]
    evaluations: int
    checkpoints: int
    overheads: tuple[Overheads, Overheads]  # slow, fast

    @property
    def hours(self) -> tuple[float, float]:
        """(slow, fast) wall-clock of the whole run."""
        return tuple(sum(p.hours[i] for p in self.phases) + self.overheads[i].hours for i in (0, 1))


def clock(recipe: Recipe, setting: Setting, gpus: int, gpus_per_node: int, params: int, accums: list[int],
          precision: str, stage: int) -> Clock:
    """The wall-clock of `recipe` on `gpus` GPUs; `accums`: each phase's accumulation; `stage`: ZeRO's."""
    from flip_ds.schedule import PhasePlan

    g, world = recipe.train.global_batch, gpus
    act_bytes = 2 if precision == "bf16" else 4
    flops_per_s = [setting.peak_tflops * 1e12 * m for m in setting.mfu]
    phases = []
    for span, accum in zip(PhasePlan(recipe.phases, recipe.optim, g).spans, accums):
        per_sample = flops_per_sample(recipe.model, span.phase.mask_ratio)
        extra_forwards = (accum > 1) + recipe.model.activation_checkpointing
        work = g / world * (per_sample.train + extra_forwards * per_sample.forward)
        sent = step_bytes_sent(params, stage, accum, g, recipe.model.sizes.embed_dim, world, act_bytes)
        phases.append(PhaseClock(span.phase.name, span.steps, (work / flops_per_s[0], work / flops_per_s[1]),
                                 sum(sent.values()) / setting.bandwidth(gpus, gpus_per_node), sent))
    total = recipe.total_samples
    evaluations = 0
    if recipe.eval.sets:
        every = recipe.eval.every_samples
        evaluations = (total // every if every else 0) + int(recipe.eval.at_end)
    forward = flops_per_sample(recipe.model)
    eval_flops = evaluations * len(recipe.eval.sets) * (setting.eval_images * forward.image
                                                        + setting.eval_texts * forward.text)
    c = recipe.checkpoint
    checkpoints = (total // c.every_samples if c.every_samples else 0) + len(recipe.phases) + len(c.milestones)
    state_bytes = params * (act_bytes + (4 if precision == "bf16" else 0) + 8)  # weights, fp32 master, Adam
    checkpoint_hours = checkpoints * state_bytes / (setting.checkpoint_write_gbps * 1e9) / 3600
    overheads = []
    for end, flops in enumerate(flops_per_s):
        steps_hours = sum(p.hours[end] for p in phases)
        time_limit_restarts = max(0, math.ceil(steps_hours / setting.job_hours) - 1)
        failures = setting.failures_per_gpu_day * world * steps_hours / 24
        between_checkpoints = steps_hours * (c.every_samples / total if c.every_samples else 1.0)
        restart_hours = ((time_limit_restarts + failures) * setting.restart_s / 3600
                         + failures * between_checkpoints / 2)
        overheads.append(Overheads(eval_flops / (world * flops) / 3600, checkpoint_hours, time_limit_restarts,
                                   failures, restart_hours))
    return Clock(phases, evaluations, checkpoints, (overheads[0], overheads[1]))
