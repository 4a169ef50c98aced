"""engine.json: what a TensorRT engine was built from and for, and the refusal of one that cannot run.

A serialized engine runs only on the TensorRT version and the GPU architecture that built it, and
only means anything next to the ONNX it was built from. So engine.json records the key

    onnx        sha256 of model.onnx and its external data (as the manifest records them)
    dtype       the graph's float type (fp16 for GPUs: TensorRT 11 is strongly typed)
    profiles    the optimization profiles, in engine order (export/trt/profiles.py)
    builder     the builder settings (TF32 off, optimization level, strongly typed)
    device      TensorRT version, GPU name, compute capability, SM count

plus the plan file's own sha256. The builder compares the whole key to decide whether a rebuild is
needed; the runtime compares everything but the builder settings against the manifest and the
device present, before it deserializes anything (`check_engine`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from export.manifest import FileRecord, Manifest, ManifestError
from export.trt.profiles import EngineProfile
from trees._json import fields_of, read_json_file
from trees.atomic import write_atomic
from trees.devices import device_key

ENGINE_JSON = "engine.json"
PLAN_NAME = "engine.plan"
TIMING_CACHE_NAME = "timing.cache"
ENGINE_FORMAT = "ppdeploy-tensorrt-engine"
ENGINE_FORMAT_VERSION = 1


class EngineMismatchError(ManifestError):
    """A TensorRT engine that cannot run here (other GPU, TensorRT or ONNX), with the fix."""


@dataclass(frozen=True)
class DeviceFacts:
    """What ties an engine to a machine."""

    gpu_name: str                 # torch.cuda.get_device_name
    compute_capability: str       # "major.minor" of the GPU
    sm_count: int                 # multiprocessors (a cut-down part of the same architecture differs here)
    tensorrt_version: str         # tensorrt.__version__


def present_facts(device: str, tensorrt_version: str) -> DeviceFacts:
    """The facts of CUDA device `device` ("cuda", "cuda:1") as torch reports them."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return DeviceFacts(props.name, f"{props.major}.{props.minor}", int(props.multi_processor_count), tensorrt_version)


@dataclass(frozen=True)
class BuilderSettings:
    tf32: bool = False                # off: fp32 tensors keep fp32 products (parity with torch / onnxruntime)
    optimization_level: int = 3       # TensorRT's default, 0..5 (higher: longer builds, maybe faster engines)
    strongly_typed: bool = True       # precision comes from the ONNX (TensorRT 11: always)


@dataclass(frozen=True)
class EngineKey:
    onnx: dict[str, str]                    # file (relative to the engine dir) -> sha256
    dtype: str
    profiles: tuple[EngineProfile, ...]
    builder: BuilderSettings
    device: DeviceFacts

    @classmethod
    def build(cls, manifest: Manifest, profiles: tuple[EngineProfile, ...], builder: BuilderSettings,
              device: DeviceFacts) -> "EngineKey":
        """The key of an engine built from `manifest`'s ONNX (hashes as the manifest records them:
        the builder verifies the files first) with `profiles` and `builder` on `device`."""
        files = {r.file: r.sha256 for r in (manifest.onnx, *manifest.external_data)}
        return cls(files, manifest.dtype, tuple(profiles), builder, device)

    def to_json(self) -> dict:
        return {"onnx": dict(self.onnx), "dtype": self.dtype, "profiles": [p.to_json() for p in self.profiles],
                "builder": dataclasses.asdict(self.builder), "device": dataclasses.asdict(self.device)}

    @classmethod
    def from_json(cls, data: dict) -> "EngineKey":
        return cls({str(k): str(v) for k, v in data["onnx"].items()}, str(data["dtype"]),
                   tuple(EngineProfile.from_json(p) for p in data["profiles"]), BuilderSettings(**data["builder"]),
                   DeviceFacts(**data["device"]))

    def mismatches(self, manifest: Manifest, device: DeviceFacts) -> list[str]:
        """Every reason this engine cannot serve `manifest` on `device` (empty: it can)."""
        problems = []
        want = EngineKey.build(manifest, self.profiles, self.builder, device)
        for file in sorted(set(self.onnx) | set(want.onnx)):
            built, have = self.onnx.get(file), want.onnx.get(file)
            if built != have:
                problems.append(f"ONNX file {file}: the engine was built from sha256 {_short(built)}, the manifest "
                                f"has {_short(have)}")
        if self.dtype != manifest.dtype:
            problems.append(f"dtype: the engine was built for {self.dtype}, the manifest says {manifest.dtype}")
        # Each static profile's input shapes must be what the manifest's inputs give at its (T, S).
        stale = [p.name for p in self.profiles if not p.static or _ranges(p.shapes) != _ranges(manifest.input_shapes(p.axes))]
        if stale:
            problems.append(f"profiles: the engine's {stale} are not static steps of the manifest's inputs "
                            f"({', '.join(manifest.input_names[:5])}, ...)")
        for what, built, have in (("TensorRT version", self.device.tensorrt_version, device.tensorrt_version),
                                  ("GPU", self.device.gpu_name, device.gpu_name),
                                  ("compute capability", self.device.compute_capability, device.compute_capability),
                                  ("SM count", self.device.sm_count, device.sm_count)):
            if built != have:
                problems.append(f"{what}: built with {built}, this machine has {have}")
        return problems


def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:16]


def _ranges(shapes: dict) -> dict[str, tuple[list[int], list[int]]]:
    return {name: (list(mom[0]), list(mom[2])) for name, mom in shapes.items()}


def rebuild_command(device: DeviceFacts) -> str:
    """How to rebuild an engine on this machine (the GPU named by its device key)."""
    return f"make engine GPU={device_key('cuda', device.gpu_name)}"


@dataclass(frozen=True)
class EngineRecord:
    """engine.json: the key, the plan file it describes, and the target it was built for."""

    key: EngineKey
    plan: FileRecord
    target: str                       # --target as given (informational; the key decides)
    build_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "target": self.target,
                "key": self.key.to_json(), "plan": dataclasses.asdict(self.plan),
                "build_seconds": self.build_seconds}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "EngineRecord":
        fix = "rebuild it (`python -m export engine --target <gpu>` / `make engine GPU=<gpu>`)"
        if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
            raise EngineMismatchError(f"{path} is not a ppdeploy TensorRT engine record; {fix}")
        if data.get("format_version") != ENGINE_FORMAT_VERSION:
            raise EngineMismatchError(f"{path} has engine record format {data.get('format_version')}, this ppdeploy "
                                      f"reads {ENGINE_FORMAT_VERSION}; {fix}")
        with fields_of(EngineMismatchError, f"{path} is malformed ({fix})"):
            return cls(EngineKey.from_json(data["key"]), FileRecord(**data["plan"]), str(data["target"]),
                       float(data.get("build_seconds", 0.0)))

    def write(self, directory: str | Path) -> Path:
        return write_atomic(Path(directory) / ENGINE_JSON, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "EngineRecord":
        path = Path(directory) / ENGINE_JSON
        data = read_json_file(path, EngineMismatchError, "TensorRT engine record",
                              "build one with `python -m export engine --target <gpu>` on the GPU machine")
        return cls.from_json(data, path)


def is_trt_engine_dir(directory: str | Path) -> bool:
    return (Path(directory) / ENGINE_JSON).is_file()


def check_engine(record: EngineRecord, manifest: Manifest, device: DeviceFacts) -> None:
    """Refuse an engine that was not built from this manifest's ONNX on this GPU with this TensorRT,
    naming every difference and the fix. Reads no plan bytes: call it before deserializing."""
    problems = record.key.mismatches(manifest, device)
    if problems:
        raise EngineMismatchError(
            f"the TensorRT engine in {manifest.dir} cannot run here: " + "; ".join(problems)
            + f". An engine runs only on the GPU and TensorRT version that built it, from the ONNX it was built "
              f"from: rebuild it on this machine with `{rebuild_command(device)}` (or `python -m export engine "
              f"--target {device_key('cuda', device.gpu_name)} --method {manifest.method.name}`)"
        )
