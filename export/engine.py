"""Engine dirs: where an export for (model, target, method) lives, when it is stale, and building it.

    artifacts/engines/<model>/<target>/<method>/   manifest.json, model.onnx(+data), tokenizer,
                                                  and for target cpu the ORT-optimised graph

An engine dir is stale when it is missing or unreadable, or its manifest disagrees with what is
asked for: another model fingerprint, method, method rows, dtype, or a smaller context/tree budget.
A GPU target (a name such as h100) is an fp16 export plus a TensorRT engine built on that GPU
(export/trt/: engine.plan, timing.cache, engine.json); `check_target` refuses it up front, naming
what this machine lacks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.checkpoint import model_fingerprint
from export.manifest import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE, Manifest, ManifestError
from export.methods import METHODS, MethodExtras
from export.onnx_export import DTYPES, ExportConfig, export_onnx, load_method_extras
from export.paths import ARTIFACTS_DIR
from trees.atomic import write_atomic

if TYPE_CHECKING:
    from export.trt.host import HostFacts

CPU_TARGET = "cpu"
GPU_DTYPE = "fp16"     # GPU targets: TensorRT is strongly typed, so the ONNX carries the engine's precision
DEFAULT_ORT_LEVEL = "extended"   # graph optimisation level of the saved onnxruntime graph (measured, README)


class TargetError(ValueError):
    """An engine target this build cannot make yet."""


def engine_dir(model_dir: str | Path, target: str, method: str) -> Path:
    return ARTIFACTS_DIR / "engines" / Path(model_dir).resolve().name / target / method


def check_target(target: str, host: "HostFacts | None" = None) -> None:
    """Refuse a target this machine cannot build, naming everything it lacks, before anything is
    exported or written. cpu needs nothing more; a GPU target needs tensorrt, a CUDA GPU, and that
    GPU to be the one the target names (`host`: the facts to judge, default: this machine's)."""
    if target == CPU_TARGET:
        return
    from export.trt.host import missing_for_target, probe_host

    missing = missing_for_target(target, probe_host() if host is None else host)
    if missing:
        raise TargetError(f"engine target {target!r} is a TensorRT engine built on that GPU, and this machine cannot "
                          f"build it: " + "; ".join(missing) + f". (--target {CPU_TARGET} builds the onnxruntime engine "
                          f"dir on any machine.)")


def stale_reason(directory: Path, config: ExportConfig, extras: MethodExtras, verify_files: bool = True) -> str | None:
    """Why the export in `directory` cannot serve `config` (None when it can). `verify_files=False`
    skips hashing the exported files (a runtime verifies the files it actually loads)."""
    try:
        manifest = Manifest.load(directory, verify_files=verify_files)
    except ManifestError as exc:
        return str(exc)
    checks = [
        ("model fingerprint", manifest.model.fingerprint, model_fingerprint(config.model_dir)),
        ("method", manifest.method.name, config.method),
        ("method options", manifest.method.options, dict(extras.options)),
        ("method weights (sha256)", manifest.method.weights_sha256, extras.weights_sha256),
        ("dtype", manifest.dtype, str(DTYPES[config.dtype]).removeprefix("torch.")),
    ]
    for what, have, want in checks:
        if have != want:
            return f"{what} is {have!r}, wanted {want!r}"
    if manifest.max_context < config.max_context or manifest.max_tree < config.max_tree:
        return (f"budget max_context={manifest.max_context}, max_tree={manifest.max_tree} is smaller than "
                f"wanted {config.max_context}, {config.max_tree}")
    return None


@dataclass(frozen=True)
class EngineResult:
    manifest: Manifest
    exported: bool           # False when the existing export was up to date
    reason: str | None       # why it was (re-)exported


def ensure_export(config: ExportConfig, extras: MethodExtras | None = None, log=print,
                  verify_files: bool = True) -> EngineResult:
    """Export into `config.out_dir` unless an up-to-date export is already there."""
    extras = load_method_extras(config) if extras is None else extras
    reason = stale_reason(Path(config.out_dir), config, extras, verify_files)
    if reason is None:
        return EngineResult(Manifest.load(config.out_dir, verify_files=False), False, None)
    log(f"exporting {config.model_dir} -> {config.out_dir} ({reason})")
    return EngineResult(export_onnx(config, extras, log=log), True, reason)


def build_ort_engine(config: ExportConfig, extras: MethodExtras | None = None, device_type: str = "cpu",
                     level: str = DEFAULT_ORT_LEVEL, log=print, verify_files: bool = True) -> Manifest:
    """An onnxruntime engine dir: export (if stale) and the graph optimised for the device's
    execution provider (if missing and the provider is present)."""
    import onnxruntime as ort

    from export.ort_optimize import PROVIDERS, optimize_for_ort, usable_optimized_model

    manifest = ensure_export(config, extras, log, verify_files).manifest
    provider = PROVIDERS[device_type]
    if provider in ort.get_available_providers() and usable_optimized_model(manifest, provider, level) is None:
        log(f"optimising {manifest.onnx_path} for onnxruntime {device_type} ({level})")
        manifest = optimize_for_ort(manifest, provider, level)
    return manifest


def prepare_engine(model_dir: str | Path, graph: str, extras: MethodExtras, device_type: str = "cpu",
                   max_context: int = DEFAULT_MAX_CONTEXT, max_tree: int = DEFAULT_MAX_TREE) -> Manifest:
    """The engine dir serving `graph` (vanilla, ppd, ht) with `extras` for `model_dir` on a device
    type: artifacts/engines/<model>/<cpu|cuda>/<graph>/, exported (and validated) when missing or
    stale and optimised for onnxruntime, keyed by the trained tensors' hash. Progress goes to
    stderr (stdout is the generated text)."""
    config = ExportConfig(Path(model_dir), engine_dir(model_dir, device_type, graph), method=graph,
                          checkpoint=extras.checkpoint, max_context=max_context, max_tree=max(DEFAULT_MAX_TREE, max_tree))
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    return build_ort_engine(config, extras, device_type, log=log, verify_files=False)


def engine_tree_path(manifest: Manifest, method: str | None = None) -> Path:
    """Where the tree set `method` (default: the engine's own) runs by default from this engine dir
    (Generator.from_engine): <method>-tree.json."""
    return manifest.dir / f"{method or manifest.method.name}-tree.json"


def install_tree(manifest: Manifest, tree_file: str | Path, method: str | None = None) -> Path:
    """Copy the tree file of `method` (default: the engine's own; any tree method its graph serves)
    into the engine dir (atomically), so the dir is all a deployment needs."""
    spec = METHODS[method or manifest.method.name]
    if not spec.tree_set or spec.graph != manifest.method.name:
        served = [n for n, s in METHODS.items() if s.tree_set and s.graph == manifest.method.name]
        raise ValueError(f"a {manifest.method.name!r} engine takes the trees of {served or 'no method'}, not "
                         f"{spec.name!r}'s")
    target = engine_tree_path(manifest, spec.name)
    write_atomic(target, Path(tree_file).read_text())
    return target
