"""Atomic file writes: the one home of "temp file in the same dir, then rename over the target", so a
reader (or a crash) never sees half a file and a failed write leaves the old file untouched.

    write_atomic(path, data)            bytes or text
    with atomic_path(path) as tmp:      for writers that need a filename (np.savez, safetensors,
        writer(tmp)                     torch.save, savefig); renamed over `path` only on success

Ground floor: imports nothing of ours, so every package may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODE = 0o644  # mkstemp (and safetensors) make files private; ours are shared, committed files


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """A temp path in `path`'s dir (parents created) that is fsynced, given `mode` and renamed over
    `path` when the block succeeds; on any failure it is removed and `path` is left as it was.
    `suffix` is for writers that append their own (np.savez adds ".npz" unless the name has it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str, mode: int = DEFAULT_MODE) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` atomically; returns `path`."""
    if not isinstance(data, (bytes, str)):
        raise TypeError(f"write_atomic takes bytes or str, got {type(data).__name__}")
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(payload)
    return Path(path)
