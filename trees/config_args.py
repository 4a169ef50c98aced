"""argparse flags generated from a config dataclass, so the dataclass is the one home of every
default and help text (`python -m tools trees ...`, `python -m train ...`, `python -m export ...`).

A field becomes `--field-name` of its type (`X | None` -> X); bool fields get --x/--no-x; a field
without a default is a required flag; `metadata={"help": ..., "choices": ...}` fills the rest
(`option(default, help, choices=...)` writes such a field). `add_config_command` makes a subcommand
of a dataclass, `config_from_args` turns the parsed flags back into it.
"""

from __future__ import annotations

import argparse
import json
import sys
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:
    """A config dataclass field with its CLI help (and `choices`); no default = a required flag."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        required = f.default is dataclasses.MISSING
        # A None default means "derived"; its help says from what.
        shown = not required and f.default is not None
        help_text = f.metadata.get("help", "") + (" (default: %(default)s)" if shown else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, required=required, help=help_text, choices=choices,
                            metavar=None if choices else f.name.upper(),
                            **({} if required else {"default": f.default}))


def add_config_command(subparsers: argparse._SubParsersAction, name: str, cls: type,
                       handler: Callable) -> argparse.ArgumentParser:
    """Subcommand `name` with `cls`'s fields as flags and `handler`'s docstring as help; the parsed
    namespace carries `func=handler` and `config_class=cls`."""
    parser = subparsers.add_parser(name, help=handler.__doc__, description=handler.__doc__)
    add_config_arguments(parser, cls)
    parser.set_defaults(func=handler, config_class=cls)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The `config_class` of the parsed subcommand, built from its flags."""
    cls = args.config_class
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def exit_code_of(run: Callable[[], int], errors: tuple[type[Exception], ...]) -> int:
    """Run a command; an expected error (bad input, missing file) prints as `error: ...` and exits 2,
    anything else propagates with its traceback."""
    try:
        return run()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def parse_options(pairs: list[str]) -> dict:
    """--option key=value (value parsed as JSON when possible: numbers, booleans, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
