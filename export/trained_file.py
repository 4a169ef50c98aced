"""The safetensors files of trained method tensors (ppd prompt tokens, ht transfer maps): an atomic
writer, and a header reader that refuses missing, corrupt, foreign or old files with the fix.
export/ppd.py and export/ht.py own their formats; this module owns what the two have in common."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write `tensors` with string metadata `header` via a temp file + rename (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)  # safetensors writes 0600; the checkpoint is a shared, committed file
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checked_header(path: str | Path, *, what: str, file_format: str, version: str,
                        tensor_names: set[str], train_command: str, error: type[ValueError],
                        missing_hint: str = "", expected_fingerprint: str | None = None) -> dict[str, str]:
    """The raw header of a `what` checkpoint in `file_format`/`version` holding `tensor_names`, and
    (when `expected_fingerprint` is given) trained for that model; any other file raises `error`
    saying how to get a right one (`train_command`)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint {path} does not exist: train one with `{train_command}`{missing_hint}, "
                    f"or pass the path of an existing checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            names = set(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise error(f"{path} is not a readable safetensors file ({exc}): re-create it with "
                    f"`{train_command}`") from exc
    if header.get("format") != file_format or not tensor_names <= names:
        raise error(f"{path} is not a {what} checkpoint (no '{file_format}' header): "
                    f"pass a file written by `{train_command}`")
    if header.get("version") != version:
        raise error(f"{path} has checkpoint version {header.get('version')!r}; this ppdeploy reads "
                    f"version {version}: retrain with `{train_command}`")
    fingerprint = header.get("model_fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise error(f"{path} was trained for model {fingerprint or '(unknown)'}, but the loaded model is "
                    f"{expected_fingerprint}: retrain for this model with `{train_command} --model-dir <its dir>` "
                    f"and pass that checkpoint")
    return header
