"""What the commands' parsers share: a command of actions, flags that each set one field, the
common ``--config`` and ``--json``, and whole numbers in a range (an argparse type)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def command_actions(sub: Any, name: str, help_text: str) -> Any:
    """``paygate NAME ACTION``: the command's parser of actions (the action is
    ``args.NAME_command``); add each with :func:`add_action`."""
    command = sub.add_parser(name, help=help_text)
    return command.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_action(
    actions: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    help_text: str,
    **options: Any,
) -> argparse.ArgumentParser:
    """One action of a command, run by ``run(args)`` (``options``: ``add_parser``'s, such as
    ``parents``: the arguments several actions share)."""
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text, **options)
    parser.set_defaults(run=run)
    return parser


def add_config(parser: argparse.ArgumentParser, help_text: str = "TOML settings") -> None:
    # SUPPRESS: `paygate --config F CMD` and `paygate CMD --config F` both work.
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=help_text)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@dataclass(frozen=True, slots=True)
class FieldFlag:
    """A flag that sets one field (a setting, a deployment's) when given, and leaves it to the
    settings when not (its value is then None)."""

    flag: str
    field: str
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None


class FieldFlags:
    """A command's table of field flags: added to its parser, read back as the fields given."""

    __slots__ = ("flags",)

    def __init__(self, *flags: FieldFlag) -> None:
        self.flags = flags

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        for flag in self.flags:
            parser.add_argument(
                flag.flag,
                dest=flag.field,
                type=flag.type,
                choices=flag.choices,
                default=None,
                metavar=None if flag.choices else flag.flag.lstrip("-").replace("-", "_").upper(),
                help=flag.help,
            )

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The fields the command line set (field name -> value)."""
        values = ((flag.field, getattr(args, flag.field)) for flag in self.flags)
        return {field: value for field, value in values if value is not None}


def whole_number(low: int, high: int, message: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else ``message``."""

    def parse(text: str) -> int:
        # ASCII only: str.isdigit() also passes "²", which int() refuses (argparse would then
        # say "invalid parse value" instead of the message).
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(message)
        return int(text)

    return parse
