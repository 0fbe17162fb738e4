"""Every subcommand's --help prints each default once, and never "(default: None)"."""

from __future__ import annotations

import argparse

import pytest

from lensforge.cli.main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_defaults_printed_once(command: str) -> None:
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        assert text.count("(default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: 512) (default: 512)" not in parser.format_help()
