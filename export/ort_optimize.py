"""The onnxruntime 'engine' of an export: the graph after ORT's own optimisations, saved once.

Loading the 135M step graph with optimisations on costs seconds per session; the saved optimised
graph loads with optimisations off. It is tied to the onnxruntime version and execution provider
that made it (fused ops such as SimplifiedLayerNormalization are provider kernels), so the manifest
records both and a runtime with another version or provider ignores it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from export.manifest import FileRecord, Manifest, ManifestError, check_file, sha256_file

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDER_TAGS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
PROVIDERS = {tag: provider for provider, tag in PROVIDER_TAGS.items()}   # torch device type -> provider


def graph_optimization_level(name: str):
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ValueError(f"unknown optimization level {name!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}")
    return levels[name]


def usable_optimized_model(manifest: Manifest, provider: str, level: str) -> Path | None:
    """The saved optimised graph when it was made by this onnxruntime, provider and level from this
    export's ONNX file (files checked against their hashes), else None."""
    import onnxruntime as ort

    record = manifest.ort_optimized
    if not record or (record["onnxruntime"], record["provider"], record["level"], record["source_sha256"]) != (
            ort.__version__, provider, level, manifest.onnx.sha256):
        return None
    for file in record["files"]:
        check_file(manifest.dir, FileRecord(**file))
    return manifest.dir / record["files"][0]["file"]


def optimize_for_ort(manifest: Manifest, provider: str = "CPUExecutionProvider", level: str = "extended") -> Manifest:
    """Write `model.ort-<provider>.onnx` (+ its external data) beside the export, record it in the
    manifest and return the updated manifest. Files are written into a temp dir, moved in, and
    only then named in the manifest (written atomically), so a crash leaves no trusted half-file."""
    import onnxruntime as ort

    if provider not in PROVIDER_TAGS:
        raise ValueError(f"no optimised-model support for {provider}; choose one of {', '.join(PROVIDER_TAGS)}")
    if provider not in ort.get_available_providers():
        raise ManifestError(f"onnxruntime {ort.__version__} here has no {provider} (it has "
                            f"{', '.join(ort.get_available_providers())})")
    name = f"model.ort-{PROVIDER_TAGS[provider]}.onnx"
    data_name = name + ".data"
    work = Path(tempfile.mkdtemp(prefix=".ort-opt-", dir=manifest.dir))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = graph_optimization_level(level)
        options.optimized_model_filepath = str(work / name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(manifest.onnx_path), options, providers=[provider])
        for file in (data_name, name):  # data first: the graph names it
            os.chmod(work / file, 0o644)
            os.replace(work / file, manifest.dir / file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = [dataclasses.asdict(FileRecord(f, sha256_file(manifest.dir / f), (manifest.dir / f).stat().st_size))
             for f in (name, data_name)]
    updated = dataclasses.replace(manifest, ort_optimized={
        "files": files, "onnxruntime": ort.__version__, "provider": provider, "level": level,
        "source_sha256": manifest.onnx.sha256})
    updated.write()
    return updated
