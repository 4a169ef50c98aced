"""The safetensors files of trained method tensors (ppd prompt tokens, ht transfer maps): an atomic
writer, and a header reader that refuses missing, corrupt, foreign or old files with the fix.
export/ppd.py and export/ht.py own their formats; this module owns what the two have in common."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trees.atomic import atomic_path


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write `tensors` with string metadata `header` via a temp file + rename (never a half file)."""
    path = Path(path)
    with atomic_path(path) as tmp:  # safetensors writes 0600; atomic_path makes the shared file 0644
        save_file(tensors, str(tmp), metadata=header)
    return path


@dataclass(frozen=True)
class TrainedFileFormat:
    """One trained-tensor checkpoint format: its header tags, its tensors, and how to get a right file."""
    what: str                       # adjective in messages: "PPD prompt-token"
    contents: str                   # noun in messages: "prompt tokens"
    file_format: str                # header "format"
    version: str                    # header "version"
    tensor_names: frozenset[str]
    train_command: str
    error: type[ValueError]         # raised for every refusal
    missing_hint: str = ""          # said after the train command when the file is missing


def read_checked_header(path: str | Path, fmt: TrainedFileFormat,
                        expected_fingerprint: str | None = None) -> dict[str, str]:
    """The raw header of a `fmt` checkpoint holding its tensors, and (when `expected_fingerprint` is
    given) trained for that model; any other file raises `fmt.error` saying how to get a right one."""
    path, error, command = Path(path), fmt.error, fmt.train_command
    if not path.is_file():
        raise error(f"{fmt.what} checkpoint {path} does not exist: train one with `{command}`{fmt.missing_hint}, "
                    f"or pass the path of an existing checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            names = set(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise error(f"{path} is not a readable safetensors file ({exc}): re-create it with `{command}`") from exc
    if header.get("format") != fmt.file_format or not fmt.tensor_names <= names:
        raise error(f"{path} is not a {fmt.what} checkpoint (no '{fmt.file_format}' header): "
                    f"pass a file written by `{command}`")
    if header.get("version") != fmt.version:
        raise error(f"{path} has checkpoint version {header.get('version')!r}; this ppdeploy reads "
                    f"version {fmt.version}: retrain with `{command}`")
    fingerprint = header.get("model_fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise error(f"{path} was trained for model {fingerprint or '(unknown)'}, but the loaded model is "
                    f"{expected_fingerprint}: retrain for this model with `{command} --model-dir <its dir>` "
                    f"and pass that checkpoint")
    return header


def header_ints(path: str | Path, header: dict[str, str], keys: tuple[str, ...],
                fmt: TrainedFileFormat) -> tuple[int, ...]:
    """The integer header fields `keys`, in order; a missing or non-integer one is a damaged file."""
    try:
        return tuple(int(header[key]) for key in keys)
    except (KeyError, ValueError) as exc:
        raise fmt.error(f"{path} has a damaged header ({exc}): re-create it with `{fmt.train_command}`") from exc


def check_hidden_size(path: str | Path, saved: int, hidden_size: int, fmt: TrainedFileFormat) -> None:
    if saved != hidden_size:
        raise fmt.error(f"{path} holds {fmt.contents} of hidden size {saved}, but the model's hidden size is "
                        f"{hidden_size}: use a checkpoint trained for this model "
                        f"(`{fmt.train_command} --model-dir <its dir>`)")


def load_checked_tensors(path: str | Path, shapes: dict[str, tuple[int, ...]],
                         fmt: TrainedFileFormat) -> dict[str, torch.Tensor]:
    """The tensors named in `shapes` as fp32, refused when one's shape is not what the header promised
    (`shapes`) or when one holds a NaN or an inf."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name).to(torch.float32) for name in shapes}
    wrong = [name for name, tensor in tensors.items() if tuple(tensor.shape) != tuple(shapes[name])]
    if wrong:
        found = ", ".join(f"{name} {tuple(tensors[name].shape)}" for name in wrong)
        promised = ", ".join(f"{name} {tuple(shapes[name])}" for name in wrong)
        raise fmt.error(f"{path} holds {found}, but its header says {promised}: re-create it with "
                        f"`{fmt.train_command}`")
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise fmt.error(f"{path} holds non-finite values in {', '.join(bad)}: re-create it with "
                        f"`{fmt.train_command}`")
    return tensors
