"""A stand-in for the part of TensorRT's Python API that ppdeploy calls (export/trt/build.py,
runtime/backends/trt_backend.py), so everything around TensorRT runs on the CPU.

It keeps the rules of the real API that our code has to follow (TensorRT 10/11 bindings docs):
  - the builder needs every network input in every optimization profile, min <= opt <= max;
  - build_serialized_network / deserialize_cuda_engine return None on failure (reason in the logger);
  - a context starts on profile 0; selecting a profile invalidates its shapes (and here, its
    addresses too); set_input_shape refuses a shape outside the active profile (False + error log);
  - set_tensor_address refuses a null or non-256-byte-aligned pointer (False + error log);
  - execute_async_v3 needs every input's shape and address and every output's address, and writes
    each output densely at its real shape to its address;
  - tensor dtypes are the engine's (get_tensor_dtype: DataType.FLOAT / HALF / INT64, from the ONNX);
  - work enqueued on a stream runs when something waits for that stream (FakeStreams, the model of
    runtime/backends/streams.py): a backend that reads outputs without ordering the caller's stream
    after the engine's reads outputs not yet written. CUDA graphs: capture records the execution once,
    replays run it again at the same addresses (FakeStreams counts both).
Its "plan" is JSON naming the ONNX and the profiles; execution runs that ONNX with onnxruntime on
the bound (CPU) pointers, in the ONNX's own dtypes (fp16 buffers for an fp16 export). What it cannot
show: TensorRT's numerics, kernels, or real GPU memory.
"""

from __future__ import annotations

import ctypes
import enum
import json

import numpy as np

from export.manifest import graph_io

FAKE_CACHE = b"fake-timing-cache:"


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity, msg) -> None:
        raise NotImplementedError


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    TF32 = 7


class FakeTensorRT:
    """The module object: `trt.Builder(logger)`, `trt.OnnxParser(network, logger)`, `trt.Runtime(logger)`."""

    ILogger = ILogger
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    BuilderFlag = BuilderFlag

    def __init__(self, version: str = "10.16.1.11", fail_build: bool = False, parse_errors: tuple[str, ...] = ()) -> None:
        self.__version__ = version
        self.fail_build = fail_build
        self.parse_errors = parse_errors
        self.builds: list[dict] = []          # what each build was asked for
        self.deserialized = 0
        self.contexts: list[Context] = []
        self.pending: dict[int, list] = {}    # stream handle -> executions enqueued there, not yet run

    def Builder(self, logger) -> "Builder":
        return Builder(self, logger)

    def OnnxParser(self, network, logger) -> "OnnxParser":
        return OnnxParser(self, network, logger)

    def Runtime(self, logger) -> "Runtime":
        return Runtime(self, logger)


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_path: str | None = None
        self.inputs: list[str] = []


class OnnxParser:
    def __init__(self, trt: FakeTensorRT, network: Network, logger) -> None:
        self.trt, self.network, self.logger = trt, network, logger
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        if self.trt.parse_errors:
            self.errors = list(self.trt.parse_errors)
            return False
        self.network.onnx_path = path
        self.network.inputs = [t.name for t in graph_io(path)[0]]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, name, low, opt, high) -> None:
        self.shapes[name] = (list(low), list(opt), list(high))


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.builds = int(data[len(FAKE_CACHE):]) if data.startswith(FAKE_CACHE) else 0
        self.valid = data == b"" or data.startswith(FAKE_CACHE)

    def serialize(self) -> bytes:
        return FAKE_CACHE + str(self.builds).encode()


class Config:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}          # TF32 is on by default
        self.builder_optimization_level = 3
        self.profiles: list[Profile] = []
        self.cache: TimingCache | None = None

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if not cache.valid and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        return self.cache


class Builder:
    def __init__(self, trt: FakeTensorRT, logger) -> None:
        self.trt, self.logger = trt, logger

    def create_network(self, flags: int) -> Network:
        return Network(flags)

    def create_builder_config(self) -> Config:
        return Config()

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
        def fail(message: str) -> None:
            self.logger.log(Severity.ERROR, message)

        if self.trt.fail_build:
            return fail("fake: out of GPU memory while timing tactics")
        if not config.profiles:
            return fail("network has dynamic inputs but no optimization profile")
        for index, profile in enumerate(config.profiles):
            missing = set(network.inputs) - set(profile.shapes)
            if missing:
                return fail(f"profile {index} has no shapes for {sorted(missing)}")
            for name, (low, opt, high) in profile.shapes.items():
                if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                    return fail(f"profile {index}, {name}: not min <= opt <= max: {low} {opt} {high}")
        config.cache.builds += 1
        self.trt.builds.append({"flags": network.flags, "tf32": BuilderFlag.TF32 in config.flags,
                                "level": config.builder_optimization_level, "profiles": len(config.profiles)})
        return json.dumps({"onnx": network.onnx_path, "profiles": [p.shapes for p in config.profiles]}).encode()


class Runtime:
    def __init__(self, trt: FakeTensorRT, logger) -> None:
        self.trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, data: bytes) -> "Engine | None":
        self.trt.deserialized += 1
        try:
            plan = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.logger.log(Severity.ERROR, "fake: the plan is not a serialized engine of this version")
            return None
        return Engine(self.trt, plan, self.logger)


class Engine:
    def __init__(self, trt: FakeTensorRT, plan: dict, logger) -> None:
        self.trt, self.logger = trt, logger
        self.onnx_path = plan["onnx"]
        self.profiles = plan["profiles"]
        inputs, outputs = graph_io(self.onnx_path)
        self.inputs = {t.name: t for t in inputs}
        self.outputs = {t.name: t for t in outputs}
        self.names = list(self.inputs) + list(self.outputs)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_dtype(self, name: str) -> "DataType":
        spec = self.inputs.get(name) or self.outputs[name]
        return DataType({"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}[spec.dtype])

    def create_execution_context(self) -> "Context":
        context = Context(self)
        self.trt.contexts.append(context)
        return context


class Context:
    def __init__(self, engine: Engine) -> None:
        import onnxruntime as ort

        self.engine = engine
        self.session = ort.InferenceSession(engine.onnx_path, providers=["CPUExecutionProvider"])
        self.profile = 0
        self.shapes: dict[str, list[int]] = {}
        self.addresses: dict[str, int] = {}
        self.runs: list[tuple[int, dict[str, list[int]]]] = []     # (profile, input shapes) per execution

    def _error(self, message: str) -> bool:
        self.engine.logger.log(Severity.ERROR, message)
        return False

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < len(self.engine.profiles):
            return self._error(f"profile index {index} out of range")
        self.profile = index
        self.shapes.clear()
        self.addresses.clear()
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        if name not in self.engine.inputs:
            return self._error(f"{name} is not an input")
        low, _, high = self.engine.profiles[self.profile][name]
        shape = list(shape)
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high)):
            return self._error(f"{name}: shape {shape} outside profile {self.profile} [{low}, {high}]")
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """An input's set shape; an output's from the input shapes (the graph's symbolic axes resolved),
        -1 where an axis is not known yet, as TensorRT reports it."""
        if name in self.engine.inputs:
            return tuple(self.shapes.get(name, [-1] * len(self.engine.profiles[self.profile][name][0])))
        symbols = {}
        for meta in self.session.get_inputs():
            for dim, value in zip(meta.shape, self.shapes.get(meta.name, ())):
                if isinstance(dim, str):
                    symbols[dim] = value
        meta = next(m for m in self.session.get_outputs() if m.name == name)
        return tuple(symbols.get(d, -1) if isinstance(d, str) else int(d) for d in meta.shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names:
            return self._error(f"{name} is not an I/O tensor")
        if address == 0 or address % 256:
            return self._error(f"{name}: address {address:#x} is null or not 256-byte aligned")
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        missing = [n for n in self.engine.inputs if n not in self.shapes or n not in self.addresses]
        missing += [n for n in self.engine.outputs if n not in self.addresses]
        if missing:
            return self._error(f"execute without shapes/addresses for {missing}")
        queue = self.engine.trt.pending.get(stream)
        if queue is not None:            # a stream of FakeStreams: it runs when something waits for it
            queue.append((self, dict(self.shapes), dict(self.addresses)))
        else:
            self.run_now(self.shapes, self.addresses)
        return True

    def run_now(self, shapes: dict, addresses: dict) -> None:
        binding = self.session.io_binding()
        for name, spec in self.engine.inputs.items():
            binding.bind_input(name, "cpu", 0, np.dtype(spec.dtype), shapes[name], addresses[name])
        for name in self.engine.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        for name, array in zip(self.engine.outputs, binding.copy_outputs_to_cpu()):
            array = np.ascontiguousarray(array)
            ctypes.memmove(addresses[name], array.ctypes.data, array.nbytes)   # dense, at its real shape
        self.runs.append((self.profile, dict(shapes)))


class DataType:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"DataType.{self.name}"


class FakeStreams:
    """A model of runtime/backends/streams.py for the stand-in: the engine's stream is a queue whose
    executions run when the caller's stream waits for it (engine_done); graphs are captured once per run
    and replayed."""

    HANDLE = 7

    def __init__(self, trt: FakeTensorRT, order_after_engine: bool = True) -> None:
        self.trt = trt
        trt.pending[self.HANDLE] = []
        self.order_after_engine = order_after_engine   # False: a backend that forgets to wait for the engine
        self.captures = self.replays = 0

    def engine_stream(self) -> int:
        return self.HANDLE

    def engine_done(self) -> None:
        if not self.order_after_engine:
            return
        queue = self.trt.pending[self.HANDLE]
        while queue:
            context, shapes, addresses = queue.pop(0)
            context.run_now(shapes, addresses)

    def capture(self, run):
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            run()
        return replay
