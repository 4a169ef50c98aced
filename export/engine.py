"""Engine dirs: where an export for (model, target, method) lives, when it is stale, and building it.

    artifacts/engines/<model>/<target>/<method>/         manifest.json, model.onnx(+data), tokenizer,
                                                        and for target cpu the ORT-optimised graph
    artifacts/engines/<model>/<target>/<method>-int8/    the same for a weight-only quantized variant
                                                        (int8, int4), made from the fp32 dir's graph

An engine dir is stale when it is missing or unreadable, or its manifest disagrees with what is
asked for: another model fingerprint, method, method rows, dtype, variant or quantization scheme,
or a smaller context/tree budget.
A GPU target (a name such as h100) is an fp16 export plus a TensorRT engine built on that GPU
(export/trt/: engine.plan, timing.cache, engine.json); `check_target` refuses it up front, naming
what this machine lacks.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.checkpoint import model_fingerprint
from export.manifest import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE, Manifest, ManifestError
from export.methods import METHODS, MethodExtras
from export.onnx_export import DTYPES, ExportConfig, export_onnx, load_method_extras
from export.paths import ARTIFACTS_DIR
from export.quantize import DEFAULT_VARIANT, SCHEMES, check_variant, quantization_stale_reason, quantize_export
from trees.atomic import write_atomic

if TYPE_CHECKING:
    from export.trt.host import HostFacts

CPU_TARGET = "cpu"
GPU_DTYPE = "fp16"     # GPU targets: TensorRT is strongly typed, so the ONNX carries the engine's precision
DEFAULT_ORT_LEVEL = "extended"   # graph optimisation level of the saved onnxruntime graph (measured, README)


class TargetError(ValueError):
    """An engine target this build cannot make yet."""


def engine_dir(model_dir: str | Path, target: str, method: str, variant: str = DEFAULT_VARIANT) -> Path:
    """fp32: .../<target>/<method>; a quantized variant: .../<target>/<method>-<variant>."""
    name = method if check_variant(variant) == DEFAULT_VARIANT else f"{method}-{variant}"
    return ARTIFACTS_DIR / "engines" / Path(model_dir).resolve().name / target / name


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
    if manifest.shape_free != config.shape_free:
        return f"shape-free attention is {manifest.shape_free}, wanted {config.shape_free}"
    quantization = quantization_stale_reason(manifest, config.variant)
    if quantization is not None:
        return quantization
    if (manifest.max_context < config.max_context or manifest.max_tree < config.max_tree
            or manifest.max_batch < config.max_batch):
        return (f"budget max_context={manifest.max_context}, max_tree={manifest.max_tree}, max_batch={manifest.max_batch} "
                f"is smaller than wanted {config.max_context}, {config.max_tree}, {config.max_batch}")
    return None


@dataclass(frozen=True)
class EngineResult:
    manifest: Manifest
    exported: bool           # False when the existing export was up to date
    reason: str | None       # why it was (re-)exported


def ensure_export(config: ExportConfig, extras: MethodExtras | None = None, log=print,
                  verify_files: bool = True, source_dir: Path | None = None) -> EngineResult:
    """Export into `config.out_dir` unless an up-to-date export is already there. A quantized variant
    is made from the fp32 export in `source_dir` (see export_variant)."""
    extras = load_method_extras(config) if extras is None else extras
    reason = stale_reason(Path(config.out_dir), config, extras, verify_files)
    if reason is None:
        return EngineResult(Manifest.load(config.out_dir, verify_files=False), False, None)
    log(f"exporting {config.model_dir} -> {config.out_dir} ({reason})")
    return EngineResult(export_variant(config, extras, log, verify_files, source_dir), True, reason)


def export_variant(config: ExportConfig, extras: MethodExtras | None = None, log=print, verify_files: bool = True,
                   source_dir: Path | None = None) -> Manifest:
    """Export `config` (always, stale or not). fp32: export_onnx. A quantized variant: quantize the fp32
    export in `source_dir` (exported there first when stale: the engine paths keep it as the fp32
    engine dir), or, without one or when the scheme needs row-exact attention (which the fp32 engine
    does not have), an fp32 export made in a temp dir beside the output and removed."""
    extras = load_method_extras(config) if extras is None else extras
    if config.variant == DEFAULT_VARIANT:
        return export_onnx(config, extras, log=log)
    out_dir = Path(config.out_dir)
    row_exact = SCHEMES[config.variant].row_exact
    if source_dir is not None and not row_exact:   # the fp32 engine's graph has the ordinary attention
        fp32 = dataclasses.replace(config, out_dir=Path(source_dir), variant=DEFAULT_VARIANT)
        source = ensure_export(fp32, extras, log, verify_files).manifest
        return quantize_export(source, out_dir, config.variant, log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".fp32-", dir=out_dir.parent))
    try:
        fp32 = dataclasses.replace(config, out_dir=temp / "fp32", variant=DEFAULT_VARIANT, row_exact=row_exact)
        return quantize_export(export_onnx(fp32, extras, log=log), out_dir, config.variant, log)
    finally:
        shutil.rmtree(temp)


def build_ort_engine(config: ExportConfig, extras: MethodExtras | None = None, device_type: str = "cpu",
                     level: str = DEFAULT_ORT_LEVEL, log=print, verify_files: bool = True,
                     source_dir: Path | None = None) -> Manifest:
    """An onnxruntime engine dir: export (if stale; a quantized variant from the fp32 export in
    `source_dir`) and the graph optimised for the device's execution provider (if missing and the
    provider is present)."""
    import onnxruntime as ort

    from export.ort_optimize import PROVIDERS, optimize_for_ort, usable_optimized_model

    manifest = ensure_export(config, extras, log, verify_files, source_dir).manifest
    provider = PROVIDERS[device_type]
    if provider in ort.get_available_providers() and usable_optimized_model(manifest, provider, level) is None:
        log(f"optimising {manifest.onnx_path} for onnxruntime {device_type} ({level})")
        manifest = optimize_for_ort(manifest, provider, level)
    return manifest


def prepare_engine(model_dir: str | Path, graph: str, extras: MethodExtras, device_type: str = "cpu",
                   max_context: int = DEFAULT_MAX_CONTEXT, max_tree: int = DEFAULT_MAX_TREE,
                   variant: str = DEFAULT_VARIANT, max_batch: int = DEFAULT_MAX_BATCH) -> Manifest:
    """The engine dir serving `graph` (vanilla, ppd, ht) with `extras` for `model_dir` on a device
    type: artifacts/engines/<model>/<cpu|cuda>/<graph>[-<variant>]/, exported (and validated) when
    missing or stale and optimised for onnxruntime, keyed by the trained tensors' hash; a quantized
    variant is made from a row-exact fp32 export in a temp dir (export_variant). Progress goes to
    stderr (stdout is the generated text)."""
    config = ExportConfig(Path(model_dir), engine_dir(model_dir, device_type, graph, variant), method=graph,
                          checkpoint=extras.checkpoint, max_context=max_context, max_tree=max(DEFAULT_MAX_TREE, max_tree),
                          max_batch=max(DEFAULT_MAX_BATCH, max_batch), variant=variant,
                          # GPU graphs with every node on the device (the quantized ones are row-exact CPU graphs)
                          shape_free=device_type == "cuda" and variant == DEFAULT_VARIANT)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    return build_ort_engine(config, extras, device_type, log=log, verify_files=False,
                            source_dir=engine_dir(model_dir, device_type, graph))


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
