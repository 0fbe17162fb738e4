"""Every subcommand's --help prints each default once, and never "(default: None)"."""

from __future__ import annotations

import argparse

import pytest

from lensforge.cli.main import build_parser

pytestmark = pytest.mark.integration  # lensforge as a user runs it


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


def test_train_help_is_trainconfig_field_docs() -> None:
    """`lensforge train --help` is TrainConfig's field docs: every field documented, every
    option that sets a field shows that doc and the field's default."""
    from dataclasses import fields

    from lensforge.training import TrainConfig

    defaults = TrainConfig()
    docs = {f.name: f.metadata.get("help") for f in fields(TrainConfig)}
    assert all(docs.values()), [name for name, doc in docs.items() if not doc]
    options = {a.dest: a for a in _subparsers()["train"]._actions if a.dest in docs}
    assert set(options) == set(docs)  # no field without an option (config_from_args maps 1:1)
    for name, action in options.items():
        assert action.help == docs[name], name
        assert action.default == getattr(defaults, name), name
    help_text = " ".join(_subparsers()["train"].format_help().split())
    assert "learning rate (unset: the optimizer's" in help_text
    assert "weight decay (unset: the optimizer's" in help_text
