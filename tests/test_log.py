"""flip-ds's log: rank 0 reports progress on stdout, every rank reports problems on stderr, one format."""

import logging
import re

from flip_ds.log import setup_logging

LINE = r"\[flip-ds \d\d:\d\d:\d\d{where}\] {level}{message}\n"


def _emit(rank: int, world: int) -> None:
    setup_logging(rank, world)
    log = logging.getLogger("flip_ds.train")  # any module's logger
    log.info("step 3/10")
    log.warning("loss is not finite")


def test_rank_0_reports_progress_and_problems_in_one_format(capsys):
    _emit(0, 2)
    out, err = capsys.readouterr()
    assert re.fullmatch(LINE.format(where=" rank 0", level="", message="step 3/10"), out), out
    assert re.fullmatch(LINE.format(where=" rank 0", level="warning: ", message="loss is not finite"), err), err


def test_other_ranks_report_only_problems(capsys):
    _emit(3, 8)
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(LINE.format(where=" rank 3", level="warning: ", message="loss is not finite"), err), err


def test_one_process_has_no_rank_tag(capsys):
    _emit(0, 1)
    out, _ = capsys.readouterr()
    assert re.fullmatch(LINE.format(where="", level="", message="step 3/10"), out), out
