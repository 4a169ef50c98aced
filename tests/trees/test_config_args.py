"""trees/config_args.py: a config dataclass is the one home of a command's flags, defaults and help."""

import argparse
from dataclasses import dataclass

import pytest

from trees.config_args import add_config_command, config_from_args, option


@dataclass(frozen=True)
class Base:
    size: int = option(4, "how many")
    name: str | None = option(None, "a name (default: derived from --size)")
    plots: bool = option(True, "draw")


@dataclass(frozen=True, kw_only=True)
class Child(Base):
    out: str = option(help="where to write")   # no default: a required flag


def child(argv: list[str]) -> int:
    """Run the child command."""
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test")
    add_config_command(p.add_subparsers(dest="command", required=True), "child", Child, child)
    return p


def test_flags_round_trip_to_the_dataclass_with_its_defaults():
    args = parser().parse_args(["child", "--out", "x"])
    assert args.func is child and config_from_args(args) == Child(out="x")
    args = parser().parse_args(["child", "--out", "y", "--size", "7", "--name", "n", "--no-plots"])
    assert config_from_args(args) == Child(size=7, name="n", plots=False, out="y")


def test_a_field_without_a_default_is_required(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["child"])
    assert "--out" in capsys.readouterr().err


def test_help_shows_defaults_but_not_none(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["child", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "how many (default: 4)" in text and "draw (default: True)" in text
    assert "derived from --size)" in text and "(default: None)" not in text
