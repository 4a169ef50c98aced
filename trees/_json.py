"""JSON text for the files under checkpoints/: indented, but short lists and small records on one
line, so step records, profiles and tree nodes stay readable and diff line by line."""

from __future__ import annotations

import json
from typing import Any

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


def write_json(path, value: Any) -> None:
    """Write atomically (temp file + rename)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(value) + "\n")
    tmp.replace(path)
