"""The files of an engine dir's graph: the ONNX with its weights as external data, their records in
the manifest, and the temp-dir-then-rename that keeps a reader from ever seeing a half-written dir.
Shared by the exporter (export/onnx_export.py) and the quantizer (export/quantize.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from export.manifest import MANIFEST_NAME, FileRecord, ManifestError, sha256_file

DATA_SUFFIX = ".data"


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """All weights in one `<name>.data` file beside the graph: no 2 GB protobuf limit, and the graph
    file stays small enough to read for the manifest checks."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024, convert_attribute=False)


def file_record(directory: Path, name: str) -> FileRecord:
    path = directory / name
    return FileRecord(name, sha256_file(path), path.stat().st_size)


def check_replaceable(out_dir: Path) -> None:
    """Only an empty dir or a previous export may be replaced: never someone's unrelated files."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ManifestError(f"{out_dir} exists, is not empty and holds no {MANIFEST_NAME}: "
                            "pick an empty --out dir (an old export there would be replaced)")


def swap_in(work: Path, out_dir: Path) -> None:
    """Rename the finished temp dir onto `out_dir`, moving any old export aside first."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old-" + work.name.rsplit("-", 1)[-1])
        out_dir.rename(old)
    work.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)
