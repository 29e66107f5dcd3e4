"""`flip-ds make-shards`: image-caption pairs to webdataset shards in img2dataset's layout."""

from __future__ import annotations

import argparse
import os

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    from flip_ds.data.captions_table import CAPTION_COLUMNS, PATH_COLUMNS

    p = sub.add_parser(
        "make-shards", help="write image-caption pairs as webdataset shards (img2dataset layout)",
        description="Write {00000..N}.tar shards of KEY.jpg + KEY.txt + KEY.json from an image folder plus a "
                    "captions file (CSV/TSV, JSON/JSONL or parquet with a path and a caption column), or from a "
                    "class-per-folder tree with caption templates. Unreadable images, missing files and empty "
                    "captions are skipped and counted. Samples are written in a random order drawn from --seed, "
                    "so a sorted input (a class tree is sorted by class) does not reach training sorted: the "
                    "training stream mixes only samples that lie near each other in its open shards. The same "
                    "input and seed give the same bytes.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output directory (must hold no .tar yet)")
    src = p.add_argument_group("source: a captions file ...")
    src.add_argument("--captions", help="CSV/TSV, JSON/JSONL or parquet file of (path, caption) rows; a caption "
                                        "cell may hold a list (one sample per caption)")
    src.add_argument("--images", default=".", help="directory that the captions file's paths are relative to")
    src.add_argument("--path-column", default=None,
                     help=f"path column (default: the first of {', '.join(PATH_COLUMNS)})")
    src.add_argument("--caption-column", default=None,
                     help=f"caption column (default: the first of {', '.join(CAPTION_COLUMNS)})")
    tree = p.add_argument_group("... or a class-per-folder tree")
    tree.add_argument("--class-folders", help="directory with one sub-folder of images per class")
    tree.add_argument("--templates", default="a photo of a {}.",
                      help="a caption template with {} for the class name, or a file of them (one a line)")
    tree.add_argument("--classnames", default=None,
                      help="file of class names, one a line in sorted folder order (default: folder names, '_' as ' ')")
    p.add_argument("--samples-per-shard", type=int, default=10000, help="samples per shard (img2dataset: 10000)")
    p.add_argument("--max-side", type=int, default=0, help="downscale so the longer side is at most this (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    order = p.add_argument_group("sample order")
    order.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order")
    order.add_argument("--no-shuffle", action="store_true",
                       help="keep the input's order (rows of the captions file, or class by class): only for input "
                            "that is already in random order, since training batches mix only nearby samples")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.config_loader import UsageError
    from flip_ds.data.make_shards import read_captions, read_class_tree, read_templates, write_shards

    if bool(args.captions) == bool(args.class_folders):
        raise UsageError("make-shards: give either --captions (with --images) or --class-folders")
    if args.captions:
        pairs = read_captions(args.captions, args.images, args.path_column, args.caption_column)
    else:
        pairs = read_class_tree(args.class_folders, read_templates(args.templates), args.classnames)
    summary = write_shards(pairs, args.out, args.samples_per_shard, args.max_side, args.quality, args.workers,
                           progress=not args.no_progress, shuffle_seed=None if args.no_shuffle else args.seed)
    print(summary.line())
    if summary.samples and summary.shards:
        print(f"shard spec: {os.path.join(args.out, '{' + f'00000..{summary.shards - 1:05d}' + '}.tar')}")
    return 0 if summary.samples else 1
