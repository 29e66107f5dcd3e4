"""The planner: what a recipe costs on N GPUs before a single one is allocated.

Per-GPU memory is model states + activations + contrastive logits + ZeRO's communication
buckets + a fixed reserve:

- Model states follow DeepSpeed's ZeRO accounting (bf16 mixed precision: 2-byte params and
  grads, fp32 master weights, fp32 grads and two fp32 Adam moments), the same bytes as
  DeepSpeed's `estimate_zero2/3_model_states_mem_needs` (tests/test_plan.py checks it), split
  into parameters, gradients and optimizer states.
- Activations are what autograd keeps for the backward pass, counted tensor by tensor for timm's
  pre-norm ViT block with fused (flash) attention; `flip_ds.memory.saved_activation_bytes` measures
  the same quantity on a real forward pass, and the two agree within a few percent.
- The contrastive loss scores this rank's global/world rows against all global columns in fp32,
  whatever the micro batch (feature-cache accumulation keeps every negative).

Time is flip_ds.cost's: compute, communication and the overheads around the steps, as a range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from flip_ds.config import BatchSplit, Recipe
from flip_ds.config_loader import ConfigError, check, check_flag
from flip_ds.cost import Clock, Setting, clock
from flip_ds.engine_config import is_auto_stage, load_engine_json
from flip_ds.models.config import ModelConfig
from flip_ds.models.flops import flops_per_sample
from flip_ds.schedule import PhasePlan

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    def validate(self) -> None:
        check_flag(self.gpus >= 1, f"--gpus: {self.gpus} must be >= 1")
        check_flag(self.gpus_per_node >= 1, f"--gpus-per-node: {self.gpus_per_node} must be >= 1")
        check_flag(self.gpu_mem_gib > 0, f"--gpu-mem: {self.gpu_mem_gib} must be > 0")
        check_flag(self.reserve_gib >= 0, f"--reserve: {self.reserve_gib} must be >= 0")

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for the bucket sizes a JSON may leave out
DEFAULT_BUCKETS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}
# The stages `zero_optimization.stage: auto` chooses from, lowest first. Never 0: bf16 trains the
# logit scale through ZeRO's fp32 master (flip_ds.engine), and export and resuming on another world
# size read ZeRO checkpoints (flip_ds.checkpoint).
AUTO_STAGES = (1, 2, 3)


@dataclass(frozen=True)
class ZeroSetup:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    bucket_elements: int = 0  # communication buckets ZeRO allocates on the GPU, in elements

    @classmethod
    def from_engine_json(cls, config: dict, stage: int | None = None) -> ZeroSetup:
        """The engine JSON's setup; `stage` stands in for its stage (one that says 'auto' needs it)."""
        zero = config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") in ("cpu", "nvme")

        def size(key: str) -> int:
            return int(float(zero.get(key, DEFAULT_BUCKETS[key])))

        stage = int(zero.get("stage", 0) if stage is None else stage)
        if stage == 0:
            buckets = 0
        elif stage == 3:
            buckets = size("reduce_bucket_size") + size("stage3_prefetch_bucket_size")
        else:
            buckets = size("reduce_bucket_size") + size("allgather_bucket_size")
        return cls(stage, offloaded("offload_optimizer"), offloaded("offload_param"), buckets)

    def bucket_bytes(self, precision: str) -> int:
        return self.bucket_elements * (2 if precision == "bf16" else 4)

    def describe(self) -> str:
        where = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return f"ZeRO-{self.stage}" + (f", {' + '.join(where)} offloaded to CPU" if where else "")


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU, and the optimizer bytes each node's host memory holds when offloaded."""

    params: int
    grads: int
    optimizer: int
    cpu_per_node: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(total_params: int, largest_layer_params: int, zero: ZeroSetup, precision: str, world: int,
                 gpus_per_node: int) -> ModelStates:
    """Model-state bytes per GPU under ZeRO `zero.stage` for AdamW.

    bf16 (mixed precision) keeps per parameter: 2 bytes of bf16 weights, 2 of bf16 grads, and for
    the optimizer 4 of fp32 grads, 4 of fp32 master weights and 8 of Adam moments. Stage 1
    partitions the fp32 part, stage 2 also the grads, stage 3 also the weights (plus the largest
    layer gathered with its grad during its forward/backward). fp32 training has no master copy.
    Offloading moves the partitioned optimizer part (and with stage 3 params, the weights) to CPU.
    """
    p, n, layer = total_params, world, largest_layer_params
    half = 2 if precision == "bf16" else 4  # weight / grad bytes as the model computes with them
    fp32_grad = 4 if precision == "bf16" else 0  # bf16: an fp32 copy of the grad partition feeds Adam
    master = 4 if precision == "bf16" else 0
    optim = master + 8  # fp32 master weights (bf16 only) + Adam's two moments
    stage, offload = zero.stage, zero.offload_optimizer
    if stage == 0:
        return ModelStates(half * p, (half + fp32_grad) * p, optim * p)
    if stage in (1, 2):
        grads = half * p if stage == 1 else (0 if offload else half * p // n)
        if offload:
            return ModelStates(half * p, grads, 0, (fp32_grad + optim) * p // n * gpus_per_node)
        return ModelStates(half * p, grads + fp32_grad * p // n, optim * p // n)
    # stage 3: the largest layer is gathered (weights) and its grads materialised in full, transiently
    live = half * layer
    if zero.offload_params:
        return ModelStates(live, live, 0, (half + fp32_grad + optim) * p // n * gpus_per_node)
    if offload:
        return ModelStates(half * p // n + live, live, 0, (fp32_grad + optim) * p // n * gpus_per_node)
    return ModelStates(half * p // n + live, fp32_grad * p // n + live, optim * p // n)


def parameter_counts(cfg: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module) of the FLIP model, built on the
    meta device (no memory). The largest module is what ZeRO-3 gathers at once, as DeepSpeed's
    own estimator counts it."""
    import torch

    from flip_ds.models.flip import FLIP

    with torch.device("meta"):
        model = FLIP(cfg, vocab_size)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@dataclass(frozen=True)
class TowerShape:
    tokens: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float


def block_activation_bytes(batch: int, t: TowerShape, act: int) -> float:
    """What one timm pre-norm ViT block saves for backward, with fused (flash) attention.

    Per token, in units of the width: LN1 input 1, LN1 output (qkv input) 1, q/k/v 3 (views of one
    tensor), attention output (also the proj input, a view) 1, LN2 input 1, LN2 output (fc1 input)
    1, fc1 output (GELU input) r, GELU output (fc2 input) r; plus the two LayerNorms' mean and rstd
    and the attention's fp32 log-sum-exp per head. No attention matrix: fused kernels recompute it.
    """
    per_token = (8 + 2 * t.mlp_ratio) * t.width * act + 4 * act + 4 * t.heads
    return batch * t.tokens * per_token


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro batch on one GPU.

    `image`, `text` and `logits_saved` are what autograd saves for backward (the quantity
    `saved_activation_bytes` measures); `backward` is the transient peak of backward through one
    block (its gradients, and with checkpointing its recomputed activations), `logits_transient`
    the logits and their gradient while the loss runs.
    """

    image: float
    text: float
    backward: float
    logits_saved: float
    logits_transient: float

    @property
    def saved(self) -> float:
        return self.image + self.text + self.logits_saved

    @property
    def towers(self) -> float:
        return self.image + self.text + self.backward

    @property
    def logits(self) -> float:
        return self.logits_saved + self.logits_transient

    @property
    def peak(self) -> float:
        return self.towers + self.logits


def tower_shapes(cfg: ModelConfig, mask_ratio: float) -> tuple[TowerShape, TowerShape]:
    s = cfg.sizes
    image = TowerShape(cfg.image_tokens(mask_ratio), s.vision_width, s.vision_depth, s.vision_heads, s.vision_mlp_ratio)
    text = TowerShape(cfg.context_length, s.text_width, s.text_depth, s.text_heads, s.text_mlp_ratio)
    return image, text


def activations(cfg: ModelConfig, micro: int, mask_ratio: float, precision: str, rows: int, columns: int,
                checkpointing: bool) -> Activations:
    """Activation bytes of one micro batch of `micro` samples.

    With checkpointing only each block's input is kept and one block at a time is recomputed in
    backward. `rows` x `columns` is this rank's logits matrix: its global/world samples against
    the global batch.
    """
    act = 2 if precision == "bf16" else 4
    image, text = tower_shapes(cfg, mask_ratio)
    towers = {}
    backward = 0.0
    for name, t in (("image", image), ("text", text)):
        block = block_activation_bytes(micro, t, act)
        block_input = micro * t.tokens * t.width * act
        towers[name] = t.depth * (block_input if checkpointing else block) + block_input  # + the final norm's input
        # backward through a block holds gradients about the size of its activations; with
        # checkpointing the block's activations are first recomputed as well
        backward = max(backward, block * (2 if checkpointing else 1))
    side = cfg.resolved_image_size
    towers["image"] += micro * 3 * side * side * act  # the images, saved by the patch embedding
    if mask_ratio > 0:  # the gather that drops patches keeps its full-length input and its index
        towers["image"] += micro * cfg.num_patches * cfg.sizes.vision_width * act + micro * (image.tokens - 1) * 8
    embed = cfg.sizes.embed_dim
    # per direction: the log-softmax output (rows x columns) and fp32 copies of the gathered columns
    # and of the scaled local rows; the logits and their gradient exist only while the loss runs
    saved = 2 * (rows * columns * 4 + columns * embed * 4 + 2 * rows * embed * 4)
    return Activations(towers["image"], towers["text"], backward, float(saved), float(2 * rows * columns * 4))


@dataclass(frozen=True)
class PhaseCost:
    name: str
    mask_ratio: float
    samples: int
    train_gflops_per_sample: float
    activations_checkpointing: Activations
    activations_no_checkpointing: Activations


@dataclass(frozen=True)
class Plan:
    recipe: str
    model: str
    params: int
    largest_layer_params: int
    vocab_size: int
    zero: ZeroSetup
    precision: str
    cluster: Cluster
    global_batch: int
    micro_batch: int  # the first phase's split, the one the trainer starts with
    accum_steps: int | None  # None: the recipe's batch does not split over these GPUs
    split_error: str  # why not, in the trainer's words; '' when it splits
    checkpointing: bool
    states: ModelStates
    phases: list[PhaseCost]
    max_micro_batch: int  # 0: not even one sample fits
    max_micro_accum: int | None
    setting: Setting
    clock: Clock
    zero_reason: str = ""  # why this stage, when the engine JSON leaves it to the planner ('auto')

    @property
    def rows(self) -> int:
        return self.global_batch // self.cluster.gpus

    def activations_of(self, phase: PhaseCost) -> Activations:
        return phase.activations_checkpointing if self.checkpointing else phase.activations_no_checkpointing

    @property
    def fixed_bytes(self) -> float:
        """Per-GPU bytes that do not depend on the micro batch: model states, ZeRO's buckets, the reserve."""
        return self.states.total + self.zero.bucket_bytes(self.precision) + self.cluster.reserve_gib * GIB

    @property
    def peak_bytes(self) -> float:
        """The worst phase's per-GPU peak at the recipe's micro batch and checkpointing."""
        return self.fixed_bytes + max(self.activations_of(p).peak for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.accum_steps is not None and self.peak_bytes <= self.cluster.gpu_mem_gib * GIB

    @property
    def hours(self) -> tuple[float, float]:
        """(slow, fast) wall-clock."""
        return self.clock.hours

    @property
    def gpu_hours(self) -> tuple[float, float]:
        return self.hours[0] * self.cluster.gpus, self.hours[1] * self.cluster.gpus

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(rows_per_gpu=self.rows, peak_gib=self.peak_bytes / GIB, fits=self.fits, hours=self.hours,
                    days=[h / 24 for h in self.hours], gpu_hours=self.gpu_hours,
                    model_states_gib={"params": self.states.params / GIB, "grads": self.states.grads / GIB,
                                      "optimizer": self.states.optimizer / GIB,
                                      "cpu_per_node": self.states.cpu_per_node / GIB})
        return data


def _divisors_descending(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def vocab_size_of(recipe: Recipe, default: int) -> int:
    """The recipe's tokenizer's vocabulary when the file is here, else `default`."""
    if recipe.data.tokenizer and Path(recipe.data.tokenizer).is_file():
        from flip_ds.data.tokenizer import Tokenizer

        return Tokenizer(recipe.data.tokenizer, recipe.model.context_length).vocab_size
    return default


def batch_splits(recipe: Recipe, world: int) -> tuple[list[BatchSplit], str]:
    """Each phase's batch split on `world` GPUs as the trainer cuts it (`Recipe.validate_world`, which
    honours `train.accum_steps`), and ''. When the recipe does not split over `world` GPUs, the
    trainer's error instead, with each phase's micro batch repeated to cover its share of the batch,
    so that the rest of the plan (and the largest micro batch that would fit) can still be costed."""
    try:
        return recipe.validate_world(world), ""
    except ConfigError as error:
        rows = recipe.train.global_batch // world
        micros = [phase.micro_batch or recipe.train.micro_batch for phase in recipe.phases]
        return [BatchSplit(micro, math.ceil(rows / micro)) for micro in micros], str(error)


def plan(recipe: Recipe, cluster: Cluster, setting: Setting, vocab_size: int, recipe_name: str = "",
         precision: str | None = None) -> Plan:
    """What `recipe` costs on `cluster`. `precision`: 'bf16' or 'fp32' as the run resolved it; None:
    the recipe's, with 'auto' as bf16 (the planner sizes GPU runs, and every GPU it plans for has
    bf16). An engine JSON whose stage is 'auto' is planned at the stage `choose_zero_stage` picks."""
    cluster.validate()
    setting.validate()
    engine = load_engine_json(recipe.train.deepspeed)
    precision = precision or ("bf16" if recipe.train.precision == "auto" else recipe.train.precision)
    if is_auto_stage(engine):
        return choose_zero_stage(recipe, cluster, setting, vocab_size, recipe_name, precision)
    return _plan(recipe, cluster, setting, vocab_size, recipe_name, precision, ZeroSetup.from_engine_json(engine))


def choose_zero_stage(recipe: Recipe, cluster: Cluster, setting: Setting, vocab_size: int, recipe_name: str,
                      precision: str) -> Plan:
    """The plan at the lowest ZeRO stage whose per-rank peak fits `cluster.gpu_mem_gib` (ZeRO-3,
    the smallest, when none does), its `zero_reason` saying why in the planner's figures.

    Lowest first because each stage up costs communication: ZeRO-2 reduce-scatters after every
    micro batch instead of once a step, ZeRO-3 also gathers the weights for every forward and
    backward. Sharding pays only when the memory it saves is needed.
    """
    engine = load_engine_json(recipe.train.deepspeed)
    tried = []
    for stage in AUTO_STAGES:
        tried.append(_plan(recipe, cluster, setting, vocab_size, recipe_name, precision,
                           ZeroSetup.from_engine_json(engine, stage)))
        if tried[-1].fits:
            break
    chosen = tried[-1]
    budget = f"{cluster.gpu_mem_gib:.3g} GiB per rank"
    passed_over = "; ".join(f"ZeRO-{p.zero.stage} needs {p.peak_bytes / GIB:.3g} GiB" for p in tried[:-1])
    if chosen.fits:
        reason = f"ZeRO-{chosen.zero.stage} fits, {_peak_parts(chosen)} within {budget}"
        reason += f"; {passed_over}" if passed_over else ""
    else:
        why = chosen.split_error or _peak_parts(chosen)
        reason = f"no stage fits {budget} ({passed_over}); ZeRO-3, the smallest: {why}"
    return dataclasses.replace(chosen, zero_reason=reason)


def _peak_parts(p: Plan) -> str:
    """'peak X GiB = model states + activations + ...' of the worst phase, in GiB."""
    worst = max(p.phases, key=lambda ph: p.activations_of(ph).peak)
    act = p.activations_of(worst)
    parts = [("model states", p.states.total), ("activations", act.towers), ("contrastive logits", act.logits),
             ("ZeRO buckets", p.zero.bucket_bytes(p.precision)), ("reserve", p.cluster.reserve_gib * GIB)]
    return f"peak {p.peak_bytes / GIB:.3g} GiB = " + " + ".join(f"{name} {b / GIB:.2f}" for name, b in parts)


def _plan(recipe: Recipe, cluster: Cluster, setting: Setting, vocab_size: int, recipe_name: str, precision: str,
          zero: ZeroSetup) -> Plan:
    g, world = recipe.train.global_batch, cluster.gpus
    check(g % world == 0, f"train.global_batch: {g} does not split over {world} GPUs; choose a multiple of {world}")
    rows = g // world
    total, largest = parameter_counts(recipe.model, vocab_size)
    states = model_states(total, largest, zero, precision, world, cluster.gpus_per_node)
    spans = PhasePlan(recipe.phases, recipe.optim, g).spans
    splits, split_error = batch_splits(recipe, world)
    ckpt = recipe.model.activation_checkpointing

    phases = []
    for span, split in zip(spans, splits):
        ph = span.phase
        samples = span.steps * g
        train_flops = flops_per_sample(recipe.model, ph.mask_ratio).train
        phases.append(PhaseCost(
            ph.name, ph.mask_ratio, samples, train_flops / 1e9,
            activations(recipe.model, split.micro, ph.mask_ratio, precision, rows, g, True),
            activations(recipe.model, split.micro, ph.mask_ratio, precision, rows, g, False)))

    budget = cluster.gpu_mem_gib * GIB - states.total - zero.bucket_bytes(precision) - cluster.reserve_gib * GIB
    worst_mask = min(p.mask_ratio for p in phases)  # fewest patches dropped: the most tokens
    max_micro = next((m for m in _divisors_descending(rows)
                      if activations(recipe.model, m, worst_mask, precision, rows, g, ckpt).peak <= budget), 0)
    return Plan(recipe=recipe_name, model=recipe.model.name, params=total, largest_layer_params=largest,
                vocab_size=vocab_size, zero=zero, precision=precision, cluster=cluster, global_batch=g,
                micro_batch=splits[0].micro, accum_steps=None if split_error else splits[0].accum,
                split_error=split_error, checkpointing=ckpt, states=states, phases=phases, max_micro_batch=max_micro,
                max_micro_accum=rows // max_micro if max_micro else None, setting=setting,
                clock=clock(recipe, setting, cluster.gpus, cluster.gpus_per_node, total,
                            [split.accum for split in splits], precision, zero.stage))
