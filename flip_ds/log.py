"""flip-ds's progress and diagnostics: Python's `logging` under the `flip_ds` logger, one format.

Modules log through `logging.getLogger(__name__)`. `setup_logging` (called by the commands that
start ranks) makes rank 0 report progress (INFO, on stdout) and every rank report warnings and
errors (on stderr), so
a problem on rank 37 is seen while rank 0's progress is not repeated N times. Lines read
`[flip-ds HH:MM:SS] message`, with the rank when there are several and the level when it is not
INFO. A program that embeds flip-ds and configures logging itself need not call it. The one-line
error of a bad recipe or flag stays a plain line on stderr (flip_ds.cli.main).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

ROOT = "flip_ds"


class _Format(logging.Formatter):
    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.where = f" rank {rank}" if world_size > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"[flip-ds {self.formatTime(record, self.datefmt)}{self.where}] {level}{record.getMessage()}"


def setup_logging(rank: int, world_size: int, progress: TextIO | None = None) -> None:
    """Handlers on the `flip_ds` logger: progress (INFO) to `progress` (default stdout; the bench
    keeps stdout for its table and passes stderr), warnings and errors to stderr. Calling it
    again replaces them."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    info = logging.StreamHandler(progress or sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (info, problems):
        handler.setFormatter(_Format(rank, world_size))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
