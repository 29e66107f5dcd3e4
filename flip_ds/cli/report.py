"""`flip-ds report`: FLIP's joint-scaling table and accuracy plots from a `flip-ds sweep` directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flip_ds.cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="scaling table (FLIP Table 6) and accuracy plots of a flip-ds sweep directory",
        description="Rebuild FLIP's joint-scaling table (paper Table 6) from SWEEP_DIR: a row per cell with its "
                    "case, each axis's label, samples seen, training time and device-hours (GPU-hours on GPUs), "
                    "then zero-shot top-1 and image->text / text->image R@1 of each eval set at the end of "
                    "training in %, with the change in points against the baseline cell in parentheses. A cell "
                    "that has not finished shows 'missing' (never an earlier or interpolated value). Writes "
                    "report.md, report.csv (unrounded fractions and deltas), accuracy_vs_samples.png and "
                    "accuracy_vs_time.png (a line per model and mask ratio, dashed log-linear trend from 3 points "
                    "up), prints the table on stdout and the files written on stderr. Safe to run while the "
                    "sweep trains. See docs/scaling.md.",
        formatter_class=HelpFormatter)
    p.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                   help="directory written by flip-ds sweep (holds cells.json and cells/*/eval/)")
    p.add_argument("--out", type=Path, default=None, help="folder to write the report to (default: SWEEP_DIR/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flip_ds.report import write_report

    report = write_report(args.sweep_dir, args.out)
    print(report.table)
    complete = sum(c.complete for c in report.sweep.cells)
    print(f"{complete} of {len(report.sweep.cells)} cells complete; wrote {', '.join(map(str, report.files))}"
          + (f" ({report.plots_skipped})" if report.plots_skipped else ""), file=sys.stderr)
    return 0
