"""`flip-ds eval zero-shot | retrieval | linear-probe`: evaluate a checkpoint or an exported model.

Runs in one process, or sharded over the ranks of torchrun / the deepspeed launcher / srun (each
rank encodes every W-th batch; features are gathered, so the numbers are the same either way).
Rank 0 shows the progress, prints a summary line and writes the JSON result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip_ds.cli import HelpFormatter

if TYPE_CHECKING:
    import torch

    from flip_ds.config import Recipe
    from flip_ds.data.tokenizer import Tokenizer
    from flip_ds.models.flip import FLIP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot classification, retrieval or linear probe of a trained model",
                       description="Evaluate a checkpoint (OUTPUT_DIR, OUTPUT_DIR/checkpoints or a tag directory) "
                                   "or an exported .safetensors file. Launch under torchrun / deepspeed / srun "
                                   "to shard the work over ranks.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)

    zs = tasks.add_parser("zero-shot", help="zero-shot top-1/top-5 on an ImageNet-style folder",
                          formatter_class=HelpFormatter)
    _common(zs)
    zs.add_argument("--data", required=True, help="image folder with one sub-folder per class (e.g. ImageNet val)")
    zs.add_argument("--classnames", default="",
                    help="'imagenet1k', a file with one name a line in sorted-folder order, or '' for folder names")
    zs.add_argument("--templates", default="clip80", help="'clip80', 'clip_short' or a file of templates with {}")
    zs.add_argument("--mask-ratio", type=float, default=0.0, help="drop this share of image patches (FLIP-style)")
    zs.set_defaults(func=run_zero_shot)

    rt = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10 (Flickr30k / COCO style)",
                          formatter_class=HelpFormatter)
    _common(rt)
    rt.add_argument("--data", required=True,
                    help="CSV/TSV (image,caption), JSON or JSONL ({image, captions}) annotations, a Karpathy-split "
                         "JSON (dataset_flickr30k.json, dataset_coco.json), or shards")
    rt.add_argument("--image-root", default="", help="folder relative image paths start at (default: the file's)")
    rt.add_argument("--split", default=None, choices=["test", "val", "train", "restval"],
                    help="Karpathy-split JSON only: the split to evaluate (default: test)")
    rt.add_argument("--mask-ratio", type=float, default=0.0, help="drop this share of image patches (FLIP-style)")
    rt.set_defaults(func=run_retrieval)

    lp = tasks.add_parser("linear-probe", help="logistic regression on frozen image features (CLIP protocol)",
                          formatter_class=HelpFormatter)
    _common(lp)
    lp.add_argument("--train", required=True, help="image folder of the training split")
    lp.add_argument("--test", required=True, help="image folder of the test split (same class folders)")
    lp.add_argument("--features", choices=["embedding", "tower"], default="embedding",
                    help="'embedding': the normalised image embedding (CLIP); 'tower': the ViT's pooled features")
    lp.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out to choose C")
    lp.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    lp.set_defaults(func=run_linear_probe)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory or exported .safetensors file")
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per forward, per rank")
    p.add_argument("--workers", type=int, default=4, help="image-decoding processes per rank")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the recipe's)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype; auto: bf16 on GPUs and on CPUs with native bf16, fp32 on other CPUs")
    p.add_argument("--seed", type=int, default=0, help="seed of masks (--mask-ratio) and the probe's split")
    p.add_argument("--json", default=None, help="write the result (metrics, settings, timings) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Session:
    """A loaded model on this rank's device, and what the JSON result reports about it."""

    model: FLIP
    tokenizer: Tokenizer
    recipe: Recipe
    meta: dict[str, Any]
    source: str
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    image_size: int
    load_s: float
    started: float

    def common(self, args: argparse.Namespace) -> dict[str, Any]:
        return dict(image_size=self.image_size, batch_size=args.batch_size, workers=args.workers,
                    device=self.device, dtype=self.dtype, progress=not args.no_progress)

    def report(self, args: argparse.Namespace, task: str, data: dict[str, Any], metrics: dict[str, float],
               settings: dict[str, Any], eval_s: float, **extra: Any) -> dict[str, Any]:
        return {"task": task, "checkpoint": str(args.checkpoint), "source": self.source,
                "model": self.recipe.model.name, "samples_seen": self.meta.get("samples_seen"),
                "step": self.meta.get("step"), "data": data, "metrics": metrics,
                "settings": {"image_size": self.image_size, "batch_size": args.batch_size,
                             "precision": str(self.dtype).removeprefix("torch."), **settings},
                **extra, "world_size": self.world, "device": str(self.device),
                "timings": {"load_s": round(self.load_s, 3), "eval_s": round(eval_s, 3),
                            "total_s": round(time.perf_counter() - self.started, 3)}}


def _check_args(args: argparse.Namespace, mask_ratio: float = 0.0) -> None:
    from flip_ds.config_loader import check_flag

    check_flag(args.batch_size > 0, f"--batch-size {args.batch_size} must be > 0")
    check_flag(args.workers >= 0, f"--workers {args.workers} must be >= 0")
    check_flag(args.image_size is None or args.image_size > 0, f"--image-size {args.image_size} must be > 0")
    check_flag(0.0 <= mask_ratio < 1.0, f"--mask-ratio {mask_ratio} must be in [0, 1)")


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Session]:
    """Join the launcher's process group (if any), load the model; always leave the group at the end."""
    from flip_ds.distributed import shutdown

    try:
        yield _open_session(args)
    finally:
        shutdown()


def _open_session(args: argparse.Namespace) -> Session:
    from flip_ds.checkpoint import build_from, read_checkpoint
    from flip_ds.config_loader import check_flag
    from flip_ds.distributed import detect_dist_env, init_for_inference
    from flip_ds.log import setup_logging
    from flip_ds.precision import resolve_on_all_ranks

    started = time.perf_counter()
    denv = detect_dist_env()
    setup_logging(denv.rank, denv.world_size, progress=sys.stderr)  # stdout holds the results
    device = init_for_inference(denv)
    precision = resolve_on_all_ranks(args.precision, device.type)
    if precision.warning and denv.rank == 0:  # every rank measured the same: said once
        logging.getLogger(__name__).warning(precision.warning)
    ckpt = read_checkpoint(args.checkpoint)
    model, tokenizer = build_from(ckpt, device)
    image_size = args.image_size or ckpt.recipe.model.resolved_image_size
    patch = ckpt.recipe.model.sizes.patch_size
    check_flag(image_size % patch == 0, f"--image-size {image_size} is not a multiple of the patch size {patch}")
    return Session(model, tokenizer, ckpt.recipe, ckpt.meta, ckpt.source, device,
                   precision.dtype, denv.rank, denv.world_size,
                   image_size, time.perf_counter() - started, started)


def _output(args: argparse.Namespace, result: dict[str, Any], summary: str) -> int:
    """Rank 0's summary line and JSON file."""
    print(summary, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def run_zero_shot(args: argparse.Namespace) -> int:
    from flip_ds.evaluation.datasets import read_image_folder
    from flip_ds.evaluation.prompts import load_classnames, load_templates
    from flip_ds.evaluation.zero_shot import evaluate_zero_shot

    _check_args(args, args.mask_ratio)
    data = read_image_folder(args.data)
    classnames = load_classnames(args.classnames, data.classes)
    templates = load_templates(args.templates)
    with _session(args) as s:
        t0 = time.perf_counter()
        r = evaluate_zero_shot(s.model, s.tokenizer, data, classnames, templates, mask_ratio=args.mask_ratio,
                               seed=args.seed, **s.common(args))
        eval_s = time.perf_counter() - t0
    if s.rank != 0:
        return 0
    result = s.report(args, "zero-shot",
                      {"path": args.data, "classes": len(data.classes), "images": r.images,
                       "skipped_images": r.skipped_images},
                      r.metrics, {"templates": args.templates, "num_templates": len(templates),
                                  "classnames": args.classnames or "folder names", "mask_ratio": args.mask_ratio,
                                  "seed": args.seed},
                      eval_s, per_class=r.per_class)
    tops = "  ".join(f"{k} {_pct(v)}" for k, v in r.metrics.items())
    return _output(args, result, f"zero-shot {tops}  ({r.images} images, {r.skipped_images} skipped, "
                                 f"{len(data.classes)} classes, {len(templates)} templates)")


def run_retrieval(args: argparse.Namespace) -> int:
    from flip_ds.evaluation.datasets import read_retrieval_set
    from flip_ds.evaluation.retrieval import evaluate_retrieval

    _check_args(args, args.mask_ratio)
    data = read_retrieval_set(args.data, args.image_root, args.split or "")
    with _session(args) as s:
        t0 = time.perf_counter()
        r = evaluate_retrieval(s.model, s.tokenizer, data, mask_ratio=args.mask_ratio, seed=args.seed,
                               **s.common(args))
        eval_s = time.perf_counter() - t0
    if s.rank != 0:
        return 0
    result = s.report(args, "retrieval",
                      {"path": args.data, **({"split": data.split} if data.split else {}),
                       "images": r.images, "captions": r.captions,
                       "skipped_images": r.skipped_images, "skipped_samples": data.skipped_samples},
                      r.metrics, {"mask_ratio": args.mask_ratio, "seed": args.seed}, eval_s)
    m = r.metrics
    return _output(args, result,
                   f"retrieval image->text R@1/5/10 {_pct(m['i2t_r1'])} {_pct(m['i2t_r5'])} {_pct(m['i2t_r10'])}  "
                   f"text->image R@1/5/10 {_pct(m['t2i_r1'])} {_pct(m['t2i_r5'])} {_pct(m['t2i_r10'])}  "
                   f"({r.images} images, {r.captions} captions, {r.skipped_images} skipped)")


def run_linear_probe(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import check_flag
    from flip_ds.evaluation.datasets import read_image_folder
    from flip_ds.evaluation.linear_probe import fit_probe, image_features

    _check_args(args)
    check_flag(0.0 < args.val_fraction < 1.0, f"--val-fraction {args.val_fraction} must be in (0, 1)")
    check_flag(args.max_iter > 0, f"--max-iter {args.max_iter} must be > 0")
    train, test = read_image_folder(args.train), read_image_folder(args.test)
    check_flag(train.classes == test.classes, f"--train and --test must have the same class folders "
                                              f"({len(train.classes)} vs {len(test.classes)})")
    with _session(args) as s:
        t0 = time.perf_counter()
        feats = {name: image_features(s.model, data, tower_only=args.features == "tower", desc=f"{name} images",
                                      **s.common(args))
                 for name, data in (("train", train), ("test", test))}
        features_s = time.perf_counter() - t0
    # The process group is gone: the single-process sklearn fit on rank 0 may take longer than a
    # collective's timeout, so no rank waits for it.
    if s.rank != 0:
        return 0
    (train_x, train_y, train_skip), (test_x, test_y, test_skip) = feats["train"], feats["test"]
    print(f"linear probe: {len(train_y)} train / {len(test_y)} test features of dim {train_x.shape[1]}; "
          "sweeping C", file=sys.stderr, flush=True)
    fit = fit_probe(train_x, train_y, test_x, test_y, val_fraction=args.val_fraction, seed=args.seed,
                    max_iter=args.max_iter)
    result = s.report(args, "linear-probe",
                      {"train": args.train, "test": args.test, "classes": len(train.classes),
                       "train_images": len(train_y), "test_images": len(test_y),
                       "skipped_images": train_skip + test_skip},
                      {"top1": fit.top1, "val_top1": fit.val_top1, "C": fit.c},
                      {"features": args.features, "val_fraction": args.val_fraction, "max_iter": args.max_iter,
                       "seed": args.seed}, time.perf_counter() - t0, sweep=fit.sweep,
                      features_s=round(features_s, 3))
    return _output(args, result, f"linear probe top1 {_pct(fit.top1)}  (C={fit.c:.3g}, held-out "
                                 f"{_pct(fit.val_top1)}; {len(train_y)} train, {len(test_y)} test images, "
                                 f"{train_skip + test_skip} skipped)")
