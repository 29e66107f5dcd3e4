"""Every subcommand's --help renders and states each optional argument's default exactly once."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from flip_ds.cli import HelpFormatter, build_parser, main

Parser = argparse.ArgumentParser


def commands(parser: Parser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Parser]]:
    """Every runnable (sub)command: those with their own options, e.g. ('eval', 'zero-shot')."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, (*prefix, name))


COMMANDS = dict(commands(build_parser()))


@pytest.mark.parametrize("name", sorted(" ".join(c) for c in COMMANDS))
def test_help_renders_and_states_each_default_once(name, capsys):
    parser = COMMANDS[tuple(name.split())]
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: flip-ds {name}")
    formatter = parser._get_formatter()
    assert isinstance(formatter, HelpFormatter), name
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        stated = formatter._get_help_string(action).count("(default:")
        if action.required or not action.option_strings and action.nargs not in ("?", "*"):
            assert stated == 0, (name, action.dest)  # nothing to default
        else:
            assert stated == 1, (name, action.dest, action.help)
