"""`flip-ds plan`: per-GPU memory, fit, micro batch, FLOPs and wall-clock of a recipe on N GPUs.

One recipe on one GPU count prints the full table; several recipes or GPU counts print them side
by side, a block per GPU count with a column per recipe (e.g. ZeRO-3 against ZeRO-2 of one run).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from flip_ds import cost
from flip_ds.cli import HelpFormatter
from flip_ds.config_loader import check_flag
from flip_ds.plan import GIB, Plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="memory, fit and cost of a recipe on N GPUs, before allocating any",
        description="Estimate per-GPU memory (model states under the recipe's ZeRO stage and offload, or under the "
                    "lowest stage that fits when its DeepSpeed JSON says \"stage\": \"auto\"; activations "
                    "with and without checkpointing at the recipe's micro batch and masked token count, contrastive "
                    "logits), whether it fits, the largest micro batch that does, the accumulation for the global "
                    "batch, FLOPs per sample, and a wall-clock and GPU-hours range: compute at an MFU range from "
                    "published CLIP runs, communication over stated bandwidths, evaluations, checkpoint writes, "
                    "restarts and failures. See docs/planner.md.",
        formatter_class=HelpFormatter)
    p.add_argument("recipes", nargs="+", metavar="RECIPE",
                   help="one or more YAML recipes (see configs/), then dotted overrides KEY=VALUE applied to each, "
                        "e.g. train.micro_batch=64; several recipes are compared side by side")
    p.add_argument("--gpus", type=int, nargs="+", required=True,
                   help="number of GPUs (ranks); several (e.g. 64 256 512) are compared side by side")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host memory of offloaded states)")
    p.add_argument("--tflops", type=float, default=cost.H100_BF16_TFLOPS,
                   help="peak dense bf16 TFLOP/s per GPU (H100 / H200 SXM: 989, A100: 312)")
    p.add_argument("--mfu", type=float, nargs=2, metavar=("LOW", "HIGH"), default=[cost.MFU_LOW, cost.MFU_HIGH],
                   help="model FLOPs utilisation range (default: OpenCLIP's ViT-H/14 run on 824 A100s and NVIDIA "
                        "NeMo's ViT-g/14 on H100s, as measured)")
    p.add_argument("--intra-node-gbps", type=float, default=cost.INTRA_NODE_GBPS,
                   help="GB/s each GPU sends in a collective within a node (NVLink)")
    p.add_argument("--inter-node-gbps", type=float, default=cost.INTER_NODE_GBPS,
                   help="GB/s each GPU sends in a collective across nodes (its network share)")
    p.add_argument("--checkpoint-write-gbps", type=float, default=cost.Setting.checkpoint_write_gbps,
                   help="the job's write bandwidth to the checkpoint file system, GB/s")
    p.add_argument("--job-hours", type=float, default=cost.Setting.job_hours, help="the partition's time limit per job")
    p.add_argument("--restart-s", type=float, default=cost.Setting.restart_s,
                   help="seconds a restart costs (requeue wait, start-up, checkpoint load)")
    p.add_argument("--failures-per-gpu-day", type=float, default=cost.FAILURES_PER_GPU_DAY,
                   help="interruption rate (default: Llama 3's, 419 in 54 days on 16,384 H100s)")
    p.add_argument("--reserve", type=float, default=4.0,
                   help="GiB per GPU held back for the CUDA context, NCCL buffers and fragmentation")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="text vocabulary, used when the recipe's tokenizer file is not on this machine")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of the table (a list of plans when comparing several)")
    p.set_defaults(func=run)


def split_recipes_and_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments with '=' are overrides (they apply to every recipe); the others recipes."""
    recipes = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    check_flag(bool(recipes), "plan: name at least one recipe before the KEY=VALUE overrides")
    return recipes, overrides


def run(args: argparse.Namespace) -> int:
    from flip_ds.config import load_recipe
    from flip_ds.plan import Cluster, plan, vocab_size_of

    paths, overrides = split_recipes_and_overrides(args.recipes)
    recipes = {path: load_recipe(path, overrides) for path in paths}  # every recipe's errors before any planning
    setting = cost.Setting(peak_tflops=args.tflops, mfu=tuple(args.mfu), intra_node_gbps=args.intra_node_gbps,
                           inter_node_gbps=args.inter_node_gbps, checkpoint_write_gbps=args.checkpoint_write_gbps,
                           job_hours=args.job_hours, restart_s=args.restart_s,
                           failures_per_gpu_day=args.failures_per_gpu_day)
    plans = []
    for gpus in args.gpus:
        cluster = Cluster(gpus=gpus, gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                          reserve_gib=args.reserve)
        for path, recipe in recipes.items():
            plans.append(plan(recipe, cluster, setting, vocab_size_of(recipe, args.vocab_size), recipe_name=path))
    if args.json:
        print(json.dumps(plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans], indent=2))
    else:
        print(format_plan(plans[0]) if len(plans) == 1 else format_comparison(plans))
    return 0


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def format_plan(p: Plan) -> str:
    """The plan as a readable table: rows are quantities, columns the recipe's phases."""
    c = p.cluster
    head = [f"plan for {p.recipe or p.model}: {c.gpus} GPUs x {c.gpu_mem_gib:g} GiB ({c.nodes} node(s) of "
            f"{c.gpus_per_node}), {p.zero.describe()}, {p.precision}",
            f"model {p.model}: {p.params / 1e6:.1f} M parameters (largest layer {p.largest_layer_params / 1e6:.1f} M, "
            f"vocab {p.vocab_size})",
            f"global batch {p.global_batch} = micro {p.micro_batch} x accum "
            f"{p.accum_steps or '?'} x {c.gpus} GPUs"
            + (f"  ({p.split_error})" if p.split_error else ""),
            *([f"ZeRO stage auto: {p.zero_reason}"] if p.zero_reason else []),
            ""]
    label_width = 40
    names = [f"{ph.name} (mask {ph.mask_ratio:g})" for ph in p.phases]
    col = max(14, *(len(n) + 3 for n in names))
    lines = [f"{'per GPU, GiB':<{label_width}}" + "".join(f"{n:>{col}}" for n in names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{label_width}}" + "".join(f"{v:>{col}}" for v in values))

    same = len(p.phases)
    row("parameters", [_gib(p.states.params)] * same)
    row("gradients", [_gib(p.states.grads)] * same)
    row("optimizer states", [_gib(p.states.optimizer)] * same)
    mark_on, mark_off = (" *", "") if p.checkpointing else ("", " *")
    row("activations, checkpointing on" + mark_on, [_gib(ph.activations_checkpointing.towers) for ph in p.phases])
    row("activations, checkpointing off" + mark_off,
        [_gib(ph.activations_no_checkpointing.towers) for ph in p.phases])
    row(f"contrastive logits ({p.rows} x {p.global_batch} fp32)", [_gib(p.activations_of(ph).logits)
                                                                    for ph in p.phases])
    row("ZeRO communication buckets", [_gib(p.zero.bucket_bytes(p.precision))] * same)
    row("reserve (CUDA, NCCL, fragmentation)", [f"{c.reserve_gib:.2f}"] * same)
    row("total (* = the recipe's setting)", [_gib(p.fixed_bytes + p.activations_of(ph).peak) for ph in p.phases])
    lines.append("")
    row("train GFLOPs per sample", [f"{ph.train_gflops_per_sample:.1f}" for ph in p.phases])
    row("samples", [_count(ph.samples) for ph in p.phases])
    t, s = p.clock, p.setting
    low, high = s.mfu
    row("steps", [f"{ph.steps:,}" for ph in t.phases])
    row(f"compute s/step at {high:.1%}-{low:.1%} MFU", [f"{ph.compute_s[1]:.2f}-{ph.compute_s[0]:.2f}"
                                                        for ph in t.phases])
    row("GB sent per GPU per step", [f"{sum(ph.bytes_sent.values()) / 1e9:.2f}" for ph in t.phases])
    bandwidth = s.bandwidth(c.gpus, c.gpus_per_node) / 1e9
    row(f"communication s/step at {bandwidth:g} GB/s", [f"{ph.communication_s:.2f}" for ph in t.phases])
    row("samples/s per GPU", [f"{ph.steps * p.global_batch / (ph.hours[0] * 3600) / c.gpus:,.0f}-"
                              f"{ph.steps * p.global_batch / (ph.hours[1] * 3600) / c.gpus:,.0f}" for ph in t.phases])
    row("hours", [f"{ph.hours[1]:,.1f}-{ph.hours[0]:,.1f}" for ph in t.phases])
    if p.states.cpu_per_node:
        lines.append(f"offloaded optimizer per node (host memory): {_gib(p.states.cpu_per_node)} GiB")
    fast, slow = t.overheads[1], t.overheads[0]
    fit = "yes" if p.fits else "NO"
    lines += ["",
              f"fits in {c.gpu_mem_gib:g} GiB: {fit} (peak {_gib(p.peak_bytes)} GiB at micro batch {p.micro_batch}, "
              f"checkpointing {'on' if p.checkpointing else 'off'})",
              "largest micro batch that fits: " + (f"{p.max_micro_batch} (accum {p.max_micro_accum})"
                                                  if p.max_micro_batch else "none: not even 1 sample per GPU"),
              "",
              f"around the steps: {t.evaluations} evaluation(s) {fast.eval_hours:.2f}-{slow.eval_hours:.2f} h; "
              f"{t.checkpoints} checkpoint write(s) {slow.checkpoint_hours:.2f} h at {s.checkpoint_write_gbps:g} GB/s; "
              f"{fast.time_limit_restarts}-{slow.time_limit_restarts} restart(s) at the {s.job_hours:g} h limit and "
              f"{fast.failures:.1f}-{slow.failures:.1f} failure(s) expected, {fast.restart_hours:.1f}-"
              f"{slow.restart_hours:.1f} h",
              f"wall-clock: {p.hours[1] / 24:,.1f}-{p.hours[0] / 24:,.1f} days "
              f"({p.hours[1]:,.0f}-{p.hours[0]:,.0f} h), "
              f"{p.gpu_hours[1]:,.0f}-{p.gpu_hours[0]:,.0f} GPU-hours: the fast end at {high:.1%} MFU with all "
              f"communication hidden, the slow end at {low:.1%} with none (docs/planner.md says where each "
              "figure comes from)"]
    return "\n".join(head + lines)


def _phase_label(group: list[Plan], i: int) -> str:
    return "/".join(dict.fromkeys(p.phases[i].name for p in group if i < len(p.phases))) or f"phase {i}"


def _phase_values(group: list[Plan], i: int, value: Callable[[Plan, int], str]) -> list[str]:
    """Phase i's value for each recipe; '-' where a recipe has fewer phases."""
    return [value(p, i) if i < len(p.phases) else "-" for p in group]


def _comparison_block(group: list[Plan]) -> list[str]:
    """One GPU count: a row per quantity, a column per recipe."""
    c = group[0].cluster
    names = [Path(p.recipe).stem if p.recipe else p.model for p in group]
    label_width = 44
    col = max(16, *(len(n) + 3 for n in names))
    lines = [f"{c.gpus} GPUs x {c.gpu_mem_gib:g} GiB ({c.nodes} node(s) of {c.gpus_per_node})",
             f"{'':<{label_width}}" + "".join(f"{n:>{col}}" for n in names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{label_width}}" + "".join(f"{v:>{col}}" for v in values))

    row("ZeRO stage, activation checkpointing",
        [f"{p.zero.stage}{' (auto)' if p.zero_reason else ''}, {'on' if p.checkpointing else 'off'}" for p in group])
    row("micro x accum", [f"{p.micro_batch} x {p.accum_steps or '?'}" for p in group])
    row("model states (GiB)", [_gib(p.states.total) for p in group])
    row("activations, worst phase (GiB)", [_gib(max(p.activations_of(ph).towers for ph in p.phases)) for p in group])
    row("contrastive logits (GiB)", [_gib(max(p.activations_of(ph).logits for ph in p.phases)) for p in group])
    row("ZeRO buckets + reserve (GiB)", [_gib(p.fixed_bytes - p.states.total) for p in group])
    row("peak per GPU (GiB)", [_gib(p.peak_bytes) for p in group])
    row(f"fits in {c.gpu_mem_gib:g} GiB", ["yes" if p.fits else "NO" for p in group])
    row("largest micro batch that fits", [f"{p.max_micro_batch} (accum {p.max_micro_accum})" if p.max_micro_batch
                                          else "none" for p in group])
    for i in range(max(len(p.phases) for p in group)):
        label = _phase_label(group, i)
        row(f"{label}: steps", _phase_values(group, i, lambda p, i: f"{p.clock.phases[i].steps:,}"))
        row(f"{label}: compute s/step", _phase_values(
            group, i, lambda p, i: f"{p.clock.phases[i].compute_s[1]:.2f}-{p.clock.phases[i].compute_s[0]:.2f}"))
        row(f"{label}: communication s/step", _phase_values(
            group, i, lambda p, i: f"{p.clock.phases[i].communication_s:.2f}"))
        row(f"{label}: samples/s per GPU", _phase_values(group, i, lambda p, i: _samples_per_s(p, p.clock.phases[i])))
    row("wall-clock (days)", [f"{p.hours[1] / 24:,.1f}-{p.hours[0] / 24:,.1f}" for p in group])
    row("GPU-hours", [f"{p.gpu_hours[1]:,.0f}-{p.gpu_hours[0]:,.0f}" for p in group])
    return lines


def _samples_per_s(p: Plan, ph: cost.PhaseClock) -> str:
    per = [ph.steps * p.global_batch / (hours * 3600) / p.cluster.gpus for hours in ph.hours]
    return f"{per[0]:,.0f}-{per[1]:,.0f}"


def format_comparison(plans: list[Plan]) -> str:
    """Several plans side by side: a block per GPU count, a column per recipe."""
    blocks = []
    for gpus in dict.fromkeys(p.cluster.gpus for p in plans):
        blocks.append("\n".join(_comparison_block([p for p in plans if p.cluster.gpus == gpus])))
    s = plans[0].setting
    low, high = s.mfu
    footer = (f"ranges: the fast end at {high:.1%} MFU with all communication hidden, the slow end at {low:.1%} with "
              f"none;\ncommunication at {s.intra_node_gbps:g} GB/s within a node, {s.inter_node_gbps:g} GB/s across "
              "nodes; one recipe on one GPU count prints its full table (docs/planner.md)")
    return "\n\n".join(blocks + [footer])
