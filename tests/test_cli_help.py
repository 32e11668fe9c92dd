"""Every option and argument of every `irlive` subcommand says what it does in `--help`."""

from __future__ import annotations

import argparse

from producer.cli import _parser


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """`path option` for every action of parser and its subparsers that has no help text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                if name not in described:
                    missing.append(f"{path} {name} (the subcommand)")
                missing += _walk(sub, f"{path} {name}")
        elif isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # -h, and options hidden on purpose
        elif not (action.help or "").strip():
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_subcommand_has_help() -> None:
    assert _walk(_parser(), "irlive") == []


def test_the_walker_finds_an_option_without_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers()
    p = sub.add_parser("go", help="go somewhere")
    p.add_argument("--far", action="store_true")
    p.add_argument("where")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    assert _walk(parser, "x") == ["x go --far", "x go where"]
