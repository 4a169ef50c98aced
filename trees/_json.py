"""JSON text for the files under checkpoints/: indented, but short lists and small records on one
line, so step records, profiles and tree nodes stay readable and diff line by line. And the reading
side every loader shares: a missing file, bad JSON or a bad field becomes the loader's own error,
saying what the file is and how to make a good one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trees.atomic import write_atomic

_ONE_LINE = 110


def _flat(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, (list, dict)) for v in value)
    if isinstance(value, dict):
        return all(not isinstance(v, dict) and (not isinstance(v, list) or _flat(v)) for v in value.values())
    return True


def dumps(value: Any, level: int = 0) -> str:
    if isinstance(value, (list, dict)) and _flat(value) and len(json.dumps(value)) <= _ONE_LINE:
        return json.dumps(value)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    if isinstance(value, list):
        items = [f"{inner}{dumps(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]" if items else "[]"
    return json.dumps(value)


def write_json(path: str | Path, value: Any) -> Path:
    """Write `value` as `dumps` text, atomically (trees/atomic.py)."""
    return write_atomic(path, dumps(value) + "\n")


def read_json_file(path: str | Path, error_cls: type[Exception], what: str, fix: str = "") -> Any:
    """The JSON value in `path`; a missing file or invalid JSON raises `error_cls`, naming the file
    as `what` and ending with `fix` (how to make a good one) when given."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.is_file():
        raise error_cls(f"{what} {path} does not exist{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error_cls(f"{what} {path} is not valid JSON ({exc}){hint}") from exc


def check_format(data: Any, expected: str, error_cls: type[Exception], what: str, fix: str) -> None:
    """Refuse JSON that is not `what`: its "format" field must be `expected`; `fix` says how to make one."""
    found = data.get("format") if isinstance(data, dict) else None
    if found != expected:
        raise error_cls(f"not {what} (format {found!r}, expected {expected!r}): {fix}")


@contextmanager
def fields_of(error_cls: type[Exception], what: str) -> Iterator[None]:
    """Reading a record's fields from JSON: a missing key or a value of the wrong type or value
    (KeyError, TypeError, ValueError) becomes `error_cls(f"{what}: {exc!r}")`; `error_cls` itself
    passes through."""
    try:
        yield
    except error_cls:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise error_cls(f"{what}: {exc!r}") from exc
