"""argparse flags generated from a config dataclass, so the dataclass is the one home of every
default and help text (`python -m trees ...`, `python -m train ...`).

A field becomes `--field-name` of its type (`X | None` -> X); bool fields get --x/--no-x; a field
without a default is a required flag; `metadata={"help": ..., "choices": ...}` fills the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        required = f.default is dataclasses.MISSING
        help_text = f.metadata.get("help", "") + ("" if required else " (default: %(default)s)")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, required=required, help=help_text, choices=choices,
                            metavar=None if choices else f.name.upper(),
                            **({} if required else {"default": f.default}))
