"""The TensorRT backend: runs a TensorRT engine dir (engine.plan + engine.json beside the manifest,
built by `python -m export engine --target <gpu>`) on the GPU that built it.

Before any plan byte is deserialized, the loader (runtime/loading.py tensorrt_graph) checked engine.json's
key against the manifest (ONNX hashes, dtype, profiles) and this machine (TensorRT version, GPU name,
compute capability, SM count), refusing a mismatch with the command that rebuilds the engine here, and
then the plan's own sha256; this backend takes that checked graph.

Static steps (export/trt/profiles.py): every profile is one step size T over all C cells of the cache,
so every step is padded to the smallest size that holds it (runtime/backends/packing.py), the cells not
in use hidden by the past mask. One execution context per profile, its profile selected and every
input's shape and address set once, at construction:
  - past_key.{i} / past_value.{i}: layer i's block [C, Hkv, D] of the KVCache's layer-major storage,
    each block 256-byte aligned (TensorRT's rule; runtime/backends/aligned.py);
  - input_ids, position_ids, tree_mask, past_mask (and the sliding masks): buffers for the largest
    size, each context bound to views of them at its T;
  - logits, new_keys, new_values: buffers for the largest size, written densely at the context's T.
A step copies its inputs into those buffers on the caller's stream, then the engine runs on a stream
of its own, ordered after the caller's and before it (runtime/backends/streams.py): execute_async_v3
on the first step of a size, then a CUDA graph of it, replayed. A StepOutput is valid until the next step.
"""

from __future__ import annotations

from types import ModuleType

import torch

from export.manifest import CACHE_AXIS, TREE_AXIS, ManifestError, ShapeError
from export.trt.build import capturing_logger
from runtime.backends.aligned import TrtRuntimeError, aligned_cache, aligned_empty, check_address
from runtime.backends.base import MANIFEST_TORCH_DTYPES, CacheOwner, EngineGraph, ModelInfo, StepTensors
from runtime.backends.layouts import LayoutCache
from runtime.backends.streams import CudaStreams, NoStreams, Streams


# TensorRT's DataType names (lowercased) as the manifest's numpy dtype names.
TRT_DTYPES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "int64": "int64", "int32": "int32"}


class TrtBackend(CacheOwner):
    def __init__(self, graph: EngineGraph, device: str | torch.device = "cuda", *,
                 tensorrt: ModuleType | None = None, max_batch: int | None = None,
                 streams: Streams | None = None) -> None:
        """Deserialize a checked plan (runtime/loading.py tensorrt_graph), make a context per static step
        size and bind it. The cache holds the engine's cells: `max_batch` sequences of max_context (default
        as many as fit). `tensorrt` and `streams` default to the real module and CUDA streams; the tests
        pass stand-ins to run the binding and stream logic on the CPU."""
        if graph.record is None:
            raise ValueError(f"{graph.path} has no checked engine.json: load it with runtime.loading.tensorrt_graph")
        self.manifest, self.record = graph.manifest, graph.record
        device = self._device(torch.device(device), tensorrt)
        tensorrt = tensorrt or _import_tensorrt()
        profiles = self.record.key.profiles
        cells = {p.axes[CACHE_AXIS].max for p in profiles}
        if not all(p.static for p in profiles) or len(cells) != 1:
            raise ManifestError(f"{self.manifest.dir}: this backend runs engines of static steps over one cell count; "
                                f"rebuild it (`python -m export engine --target ...`)")
        cells = cells.pop()
        fits = cells // graph.max_context
        if fits < 1 or (max_batch or 1) > fits:
            raise ManifestError(f"the engine's {cells} cache cells hold {fits} sequence(s) of max_context "
                                f"{graph.max_context}, not {max_batch}: rebuild with --max-batch {max_batch}")
        self._logger = capturing_logger(tensorrt)
        self._runtime = tensorrt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(graph.path.read_bytes())
        if self.engine is None:
            raise TrtRuntimeError(f"TensorRT could not deserialize {graph.path}: {self._logger.text()}")
        self._check_engine_io(len(profiles))

        m = self.manifest.model
        dtype = MANIFEST_TORCH_DTYPES[self.manifest.dtype]
        sizes = tuple(p.axes[TREE_AXIS].max for p in profiles)
        self.info = ModelInfo(m.vocab_size, self.manifest.method.num_extra_tokens, graph.max_context, device, dtype,
                              graph_sha256=self.manifest.onnx.sha256, max_batch=max_batch or fits,
                              sliding_window=m.sliding_window if m.sliding_mask_inputs else None, step_sizes=sizes)
        self._min_rows = self.manifest.min_step_rows
        self._cache = aligned_cache(m.num_layers, graph.max_context, m.num_kv_heads, m.head_dim, dtype, device,
                                    capacity=cells)
        self._layouts = LayoutCache(device, dtype)
        self._streams = streams or (CudaStreams(device) if device.type == "cuda" else NoStreams())
        self._buffers = self._allocate(max(sizes), cells)
        self.contexts = [self._bound_context(index, size, cells) for index, size in enumerate(sizes)]
        self._runs: dict[int, object] = {}     # profile index -> its captured execution (a CUDA graph's replay)

    @staticmethod
    def _device(device: torch.device, tensorrt: ModuleType | None) -> torch.device:
        if tensorrt is None and device.type != "cuda":
            raise ValueError(f"a TensorRT engine runs on a CUDA device, not {device}: pass device='cuda' "
                             f"(or load the engine dir's ONNX with onnxruntime: backend 'onnxruntime')")
        if device.type != "cuda":
            return device
        current = torch.cuda.current_device()   # TensorRT deserializes and runs on the current device
        if device.index not in (None, current):
            raise ValueError(f"TensorRT runs on the current CUDA device (cuda:{current}), not {device}: select it "
                             f"first with torch.cuda.set_device({device.index})")
        return torch.device("cuda", current)

    def _release(self) -> None:
        # Graphs before contexts, contexts before their engine, the engine before its runtime.
        self._runs.clear()
        self.contexts = []
        self.engine = self._runtime = None
        self._streams = None
        self._buffers = {}

    # --- setup ---------------------------------------------------------------------------------
    def _check_engine_io(self, profiles: int) -> None:
        plan = self.manifest.dir / self.record.plan.file
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = set(self.manifest.input_names) | set(self.manifest.output_names)
        if names != want:
            raise ManifestError(f"{plan} has I/O tensors {sorted(names)}, the manifest {sorted(want)}; rebuild the "
                                f"engine (`python -m export engine --target ...`)")
        if self.engine.num_optimization_profiles != profiles:
            raise ManifestError(f"{plan} has {self.engine.num_optimization_profiles} optimization profiles, "
                                f"engine.json {profiles}; rebuild the engine")
        for spec in self.manifest.inputs + self.manifest.outputs:   # dtypes from the engine, not assumed
            name = str(self.engine.get_tensor_dtype(spec.name)).rsplit(".", 1)[-1].lower()   # DataType.HALF -> half
            have = TRT_DTYPES.get(name, name)
            if have != spec.dtype:
                raise ManifestError(f"{plan}: {spec.name} is {have} in the engine, {spec.dtype} in the manifest; "
                                    "rebuild the engine")

    def _allocate(self, size: int, cells: int) -> dict[str, torch.Tensor]:
        """Flat, aligned buffers for steps of up to `size` nodes over `cells` cells: each input's and each
        output's (masks [T*T] / [T*S], logits [T*V], new keys/values [L*T*Hkv*D])."""
        m, dtype, device = self.manifest.model, self.info.dtype, self.info.device
        kv = m.num_layers * size * m.num_kv_heads * m.head_dim
        numel = {"input_ids": size, "position_ids": size, "tree_mask": size * size, "past_mask": size * cells,
                 "sliding_tree_mask": size * size, "sliding_past_mask": size * cells,
                 "logits": size * m.vocab_size, "new_keys": kv, "new_values": kv}
        names = ["input_ids", "position_ids", "tree_mask", "past_mask", *m.sliding_mask_inputs, *self.manifest.output_names]
        return {name: aligned_empty(numel[name], torch.int64 if name.endswith("_ids") else dtype, device)
                for name in names}

    def _views(self, t: int, cells: int) -> dict[str, torch.Tensor]:
        """The buffers viewed at a step of `t` nodes (dense at that shape, from each buffer's start)."""
        m = self.manifest.model
        shapes = {"input_ids": (t,), "position_ids": (t,), "tree_mask": (t, t), "past_mask": (t, cells),
                  "sliding_tree_mask": (t, t), "sliding_past_mask": (t, cells), "logits": (t, m.vocab_size),
                  "new_keys": (m.num_layers, t, m.num_kv_heads, m.head_dim),
                  "new_values": (m.num_layers, t, m.num_kv_heads, m.head_dim)}
        return {name: buf[: torch.Size(shapes[name]).numel()].view(shapes[name]) for name, buf in self._buffers.items()}

    def _bound_context(self, index: int, t: int, cells: int):
        """A context on profile `index` (T = t), every input's shape and every address set once."""
        context = self.engine.create_execution_context()
        if context is None:
            raise TrtRuntimeError(f"TensorRT could not create an execution context: {self._logger.text()}")
        failed = f"TensorRT could not select optimization profile {index} (T={t})"
        try:   # the bindings raise RuntimeError on failure (and document a False return)
            selected = context.set_optimization_profile_async(index, self._streams.engine_stream())
        except RuntimeError as exc:
            raise TrtRuntimeError(f"{failed}: {exc}: {self._logger.text()}") from exc
        if not selected:
            raise TrtRuntimeError(f"{failed}: {self._logger.text()}")
        tensors = dict(self._views(t, cells))
        for i, (keys, values) in enumerate(zip(self._cache.keys, self._cache.values)):
            tensors[f"past_key.{i}"], tensors[f"past_value.{i}"] = keys[:cells], values[:cells]
        for name in self.manifest.input_names:
            if not context.set_input_shape(name, list(tensors[name].shape)):
                raise TrtRuntimeError(f"TensorRT refused shape {list(tensors[name].shape)} for {name} in profile "
                                      f"{index}: {self._logger.text()}")
        for name in self.manifest.output_names:   # the engine's own output shapes, not the manifest's
            shape = tuple(context.get_tensor_shape(name))
            if shape != tuple(tensors[name].shape):
                raise TrtRuntimeError(f"the engine's {name} is {list(shape)} at T={t} over {cells} cells, the buffer "
                                      f"{list(tensors[name].shape)}: rebuild the engine (`python -m export engine "
                                      "--target ...`)")
        for name in self.manifest.input_names + self.manifest.output_names:
            check_address(name, tensors[name].data_ptr())
            if not context.set_tensor_address(name, tensors[name].data_ptr()):
                raise TrtRuntimeError(f"TensorRT refused the address of {name}: {self._logger.text()}")
        return context

    # --- the step ------------------------------------------------------------------------------
    def _check_shape(self, tree_size: int, past_length: int) -> None:
        if tree_size not in self.info.step_sizes or past_length != self._cache.capacity:
            raise ShapeError(f"no static step of this engine is T={tree_size} over S={past_length} cells (it has T in "
                             f"{list(self.info.step_sizes)} over {self._cache.capacity})")

    def _run(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, cells = inputs.size, inputs.past_length
        index = self.info.step_sizes.index(t)
        views = self._views(t, cells)
        # On the caller's stream, ordered after the last commit: device copies into the bound buffers.
        views["input_ids"].copy_(inputs.ids)
        views["position_ids"].copy_(inputs.positions)
        views["tree_mask"].copy_(inputs.tree_mask)
        views["past_mask"].copy_(inputs.past_mask)
        for name, mask in zip(self.manifest.model.sliding_mask_inputs, inputs.sliding or ()):
            views[name].copy_(mask)
        stream = self._streams.engine_stream()
        try:
            run = self._runs.get(index)
            if run is None:
                run = self._runs[index] = self._streams.capture(lambda: self._execute(index, stream))
            run()
        finally:
            self._streams.engine_done()
        return views["logits"], views["new_keys"], views["new_values"]

    def _execute(self, index: int, stream: int) -> None:
        if not self.contexts[index].execute_async_v3(stream):
            raise TrtRuntimeError(f"TensorRT execute_async_v3 failed (T={self.info.step_sizes[index]}): "
                                  f"{self._logger.text()}")


def _import_tensorrt() -> ModuleType:
    from export.trt.host import import_tensorrt

    return import_tensorrt()
