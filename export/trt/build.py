"""engine.plan from an ONNX engine dir, with TensorRT's Python API (written from the TensorRT 11.1
bindings docs and Polygraphy's loaders; kept thin: everything it decides is in profiles.py/key.py).

    OnnxParser.parse_from_file(model.onnx)   external data is read from beside the file
    network: strongly typed                  TensorRT 11 always is; 10.x gets the creation flag, by name
    config:  TF32 cleared (fp32 parity), builder optimization level, one static optimization profile per
             step size (export/trt/profiles.py), the timing cache beside the plan (reused, then saved)
    build_serialized_network                 None on failure: raised with what the logger captured

Nothing is written unless the build succeeds; then engine.plan, timing.cache and, last, engine.json
(trees/atomic.py: temp file + rename), so a reader never sees a plan without its record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from export.manifest import FileRecord, Manifest, ManifestError, check_file, sha256_file
from export.trt.key import (PLAN_NAME, TIMING_CACHE_NAME, BuilderSettings, DeviceFacts, EngineKey, EngineRecord,
                            present_facts)
from export.static_steps import step_sizes
from export.trt.profiles import EngineProfile, static_profiles
from trees.atomic import write_atomic


class TrtBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; carries TensorRT's own messages."""


def capturing_logger(trt: ModuleType) -> Any:
    """A trt.ILogger that keeps warnings and errors (`.messages`, `.text()`) so that a None from the
    builder or the runtime can be raised with TensorRT's reason."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"[{getattr(severity, 'name', severity)}] {msg}")

        def text(self, last: int = 20) -> str:
            return " | ".join(self.messages[-last:]) or "TensorRT logged nothing"

    return CapturingLogger()


def network_flags(trt: ModuleType) -> int:
    """create_network flags: STRONGLY_TYPED on TensorRT 10.x (looked up by name); 0 on 11+, where
    networks are always strongly typed and the flag is deprecated."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise TrtBuildError(f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT >= 10 "
                            f"(pip install .[tensorrt])")
    return 1 << int(flag)


def parse_onnx(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser); the parser must outlive the network's use (it owns the weights)."""
    network = builder.create_network(network_flags(trt))
    if network is None:
        raise TrtBuildError(f"TensorRT could not create a network: {logger.text()}")
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        raise TrtBuildError(f"TensorRT could not parse {onnx_path}: " + ("; ".join(errors) or logger.text()))
    return network, parser


def configure(trt: ModuleType, builder: Any, settings: BuilderSettings, profiles: tuple[EngineProfile, ...],
              timing_cache: bytes) -> Any:
    """The builder config: precision flags, optimization level, the profiles in order, the timing cache."""
    config = builder.create_builder_config()
    if settings.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)     # on by default; fp32 parity needs it off
    config.builder_optimization_level = settings.optimization_level
    for index, spec in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            profile.set_shape(name, low, opt, high)
        added = config.add_optimization_profile(profile)
        if added != index:
            raise TrtBuildError(f"TensorRT refused optimization profile {spec.name!r} (index {added}, wanted {index})")
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, False):
        # A cache from another TensorRT or GPU: start from an empty one rather than fail the build.
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return config


def build_plan(trt: ModuleType, onnx_path: Path, profiles: tuple[EngineProfile, ...], settings: BuilderSettings,
               timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) built from the ONNX at `onnx_path`."""
    if not settings.strongly_typed:
        raise TrtBuildError("ppdeploy builds strongly typed engines only: precision comes from the ONNX "
                            "(export with --dtype fp16 for GPUs)")
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, onnx_path)
    config = configure(trt, builder, settings, profiles, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtBuildError(f"TensorRT could not build an engine from {onnx_path}: {logger.text()}")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def current_record(directory: Path, key: EngineKey) -> EngineRecord | None:
    """The engine record in `directory` when it has exactly `key` and its plan is intact, else None."""
    try:
        record = EngineRecord.load(directory)
        check_file(directory, record.plan)
    except ManifestError:
        return None
    return record if record.key == key else None


def build_engine(manifest: Manifest, target: str, tree: int = 1, max_batch: int = 1,
                 settings: BuilderSettings = BuilderSettings(), *, trt: ModuleType | None = None,
                 device: DeviceFacts | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> EngineRecord:
    """Build engine.plan (+ timing.cache, engine.json) in the manifest's dir for the GPU present,
    unless an engine with the same key is already there (`force` rebuilds): static steps of the installed
    tree's T (`tree`) for up to `max_batch` sequences and of a prefill chunk, over the cells of max_batch
    sequences of the manifest's max_context. `trt` and `device` default to the real tensorrt module and
    the facts of cuda:0."""
    if trt is None:
        from export.trt.host import import_tensorrt

        trt = import_tensorrt()
    device = present_facts("cuda", trt.__version__) if device is None else device
    for record in (manifest.onnx, *manifest.external_data):  # the key names these hashes: make them true
        check_file(manifest.dir, record)
    profiles = static_profiles(manifest, step_sizes(tree, max_batch), max_batch * manifest.max_context)
    key = EngineKey.build(manifest, profiles, settings, device)
    existing = None if force else current_record(manifest.dir, key)
    if existing is not None:
        log(f"TensorRT engine up to date: {manifest.dir / PLAN_NAME}")
        return existing
    cache_path = manifest.dir / TIMING_CACHE_NAME
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
    log(f"building a TensorRT {trt.__version__} engine for {device.gpu_name} from {manifest.onnx_path} "
        f"(static steps {', '.join(p.name for p in profiles)} over {max_batch * manifest.max_context} cells; "
        f"this takes minutes)")
    start = time.perf_counter()
    plan, timing_cache = build_plan(trt, manifest.onnx_path, profiles, settings, timing_cache)
    seconds = time.perf_counter() - start
    plan_path = write_atomic(manifest.dir / PLAN_NAME, plan)
    write_atomic(cache_path, timing_cache)
    record = EngineRecord(key, FileRecord(PLAN_NAME, sha256_file(plan_path), len(plan)), target, round(seconds, 1))
    record.write(manifest.dir)
    log(f"wrote {plan_path} ({len(plan) / 2**20:.0f} MiB, {seconds:.0f} s) and its engine.json")
    return record
