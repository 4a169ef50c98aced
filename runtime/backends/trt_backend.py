"""The TensorRT backend: runs a TensorRT engine dir (engine.plan + engine.json beside the manifest,
built by `python -m export engine --target <gpu>`) on the GPU that built it.

Before any plan byte is deserialized, the loader (runtime/loading.py tensorrt_graph) checked engine.json's
key against the manifest (ONNX hashes, dtype, profiles) and this machine (TensorRT version, GPU name,
compute capability, SM count), refusing a mismatch with the command that rebuilds the engine here, and
then the plan's own sha256; this backend takes that checked graph.

Binding (the same idea as the onnxruntime backend's IOBinding, by pointer):
  - past_key.{i} / past_value.{i}: layer i's block [max_S, Hkv, D] of the KVCache's layer-major
    storage; its committed prefix [S, Hkv, D] starts at the block's first row, so only the shape
    changes per step. Every block starts on a 256-byte boundary (TensorRT's requirement; rows are
    padded so it holds for any max_context), and S = 0 still binds the block's (non-null) address.
  - input_ids, position_ids, tree_mask: static buffers sized for the largest decode tree; per step
    the token ids go up (the one upload), positions = depth + S and the layout's mask are written on
    the device.
  - logits, new_keys, new_values: flat buffers for the largest decode tree, which the engine writes
    densely at their real shape (views of the flat buffers, not slices of a [L, max_T, ...] array).
A prefill longer than the decode buffers gets aligned buffers of its own for that one step.

A context selects the step's optimization profile (decode for T <= max_tree, else prefill) with
`set_optimization_profile_async` before its input shapes are set; the engine runs with
`execute_async_v3` on the backend's own CUDA stream, ordered after the caller's stream (commits)
and before it (readout, the next commit). A StepOutput is valid until the next `step`.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from export.manifest import ManifestError
from export.trt.build import capturing_logger
from export.trt.profiles import select_profile
from runtime.backends.base import MANIFEST_TORCH_DTYPES, CacheOwner, EngineGraph, ModelInfo
from runtime.backends.layouts import LayoutCache
from runtime.kv_cache import KVCache

ALIGNMENT = 256   # bytes: what set_tensor_address accepts


class TrtRuntimeError(RuntimeError):
    """TensorRT refused a call (deserialize, shapes, addresses, execution), with its logged reason."""


def check_address(name: str, address: int, alignment: int = ALIGNMENT) -> None:
    """TensorRT takes any device pointer that is non-null and `alignment`-byte aligned."""
    if address == 0:
        raise TrtRuntimeError(f"{name}: a null pointer cannot be bound (an empty tensor binds a valid buffer)")
    if address % alignment:
        raise TrtRuntimeError(f"{name}: address {address:#x} is not {alignment}-byte aligned "
                              f"(offset {address % alignment}); TensorRT needs {alignment}-byte aligned tensors")


def aligned_rows(rows: int, row_bytes: int, alignment: int = ALIGNMENT) -> int:
    """The fewest rows >= `rows` whose bytes are a multiple of `alignment`, so that consecutive
    blocks of that many rows (the KV cache's layers) all start aligned."""
    step = alignment // math.gcd(alignment, row_bytes)
    return -(-rows // step) * step


def aligned_empty(numel: int, dtype: torch.dtype, device: torch.device, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A 1-D tensor of `numel` elements whose first element is `alignment`-byte aligned (CUDA's
    allocator already gives that; the CPU allocator, which the tests run on, gives 64)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(numel + alignment // itemsize, dtype=dtype, device=device)
    offset = (-raw.data_ptr() % alignment) // itemsize
    return raw[offset: offset + numel]


def aligned_cache(num_layers: int, max_context: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, capacity: int | None = None) -> KVCache:
    """A KVCache of `capacity` cells (default: max_context) whose layer blocks each start 256-byte
    aligned (rows padded up: the padding rows are never cells, never committed)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache = KVCache(num_layers, max_context, num_kv_heads, head_dim, dtype, "meta", capacity)  # storage replaced below
    rows = aligned_rows(cache.capacity, num_kv_heads * head_dim * itemsize)
    shape = (num_layers, rows, num_kv_heads, head_dim)
    cache.keys = aligned_empty(math.prod(shape), dtype, device).view(shape).zero_()
    cache.values = aligned_empty(math.prod(shape), dtype, device).view(shape).zero_()
    return cache


class TrtBackend(CacheOwner):
    def __init__(self, graph: EngineGraph, device: str | torch.device = "cuda", *,
                 tensorrt: ModuleType | None = None, max_batch: int = 1) -> None:
        """Deserialize a checked plan (runtime/loading.py tensorrt_graph: engine.json's key and the plan's
        sha256 checked against this machine) and create its execution context. `tensorrt` defaults to
        the real module; tests pass a stand-in to run the binding logic on the CPU."""
        if graph.record is None:
            raise ValueError(f"{graph.path} has no checked engine.json: load it with runtime.loading.tensorrt_graph")
        self.manifest = graph.manifest
        self.record = graph.record
        device = torch.device(device)
        if tensorrt is None:
            if device.type != "cuda":
                raise ValueError(f"a TensorRT engine runs on a CUDA device, not {device}: pass device='cuda' "
                                 f"(or load the engine dir's ONNX with onnxruntime: backend 'onnxruntime')")
            from export.trt.host import import_tensorrt

            tensorrt = import_tensorrt()
        if device.type == "cuda":
            current = torch.cuda.current_device()   # TensorRT deserializes and runs on the current device
            if device.index not in (None, current):
                raise ValueError(f"TensorRT runs on the current CUDA device (cuda:{current}), not {device}: select it "
                                 f"first with torch.cuda.set_device({device.index})")
            device = torch.device("cuda", current)
        self._profiles = self.record.key.profiles
        self._logger = capturing_logger(tensorrt)
        self._runtime = tensorrt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(graph.path.read_bytes())
        if self.engine is None:
            raise TrtRuntimeError(f"TensorRT could not deserialize {graph.path}: {self._logger.text()}")
        self._check_engine_io()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtRuntimeError(f"TensorRT could not create an execution context: {self._logger.text()}")

        m = self.manifest.model
        dtype = MANIFEST_TORCH_DTYPES[self.manifest.dtype]
        max_context = graph.max_context
        self.info = ModelInfo(m.vocab_size, self.manifest.method.num_extra_tokens, max_context, device, dtype,
                              graph_sha256=self.manifest.onnx.sha256, max_batch=max_batch)
        self._cache = aligned_cache(m.num_layers, max_context, m.num_kv_heads, m.head_dim, dtype, device,
                                    capacity=max_context * max_batch)
        self._layouts = LayoutCache(device, dtype)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._capacity = self.manifest.max_tree * max_batch
        self._inputs = self._allocate_inputs(self._capacity)
        self._past_mask = aligned_empty(0, dtype, device)   # [T*S] the step's past mask, grown as needed
        self._outputs = self._allocate_outputs(self._capacity)
        # Layer i's committed prefix starts at its block's first row: these addresses never change.
        self._past = [(f"past_key.{i}", k.data_ptr()) for i, k in enumerate(self._cache.keys)] + \
                     [(f"past_value.{i}", v.data_ptr()) for i, v in enumerate(self._cache.values)]
        self._active_profile: int | None = None
        self._bound: dict[str, int] = {}   # name -> address set on the context (rebound after a profile switch)

    def _release(self) -> None:
        # The context before its engine, the engine before its runtime (TensorRT's ownership order).
        self.context = None
        self.engine = None
        self._runtime = None
        self._stream = None
        self._inputs = self._outputs = ()
        self._past_mask = None
        self._past = []
        self._bound.clear()

    # --- setup ---------------------------------------------------------------------------------
    def _check_engine_io(self) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = set(self.manifest.input_names) | set(self.manifest.output_names)
        if names != want:
            raise ManifestError(f"{self.manifest.dir / self.record.plan.file} has I/O tensors {sorted(names)}, the "
                                f"manifest {sorted(want)}; rebuild the engine (`python -m export engine --target ...`)")
        if self.engine.num_optimization_profiles != len(self._profiles):
            raise ManifestError(f"{self.manifest.dir / self.record.plan.file} has {self.engine.num_optimization_profiles} "
                                f"optimization profiles, engine.json {len(self._profiles)}; rebuild the engine")

    def _allocate_inputs(self, tree_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [T], position_ids [T] (int64) and tree_mask [T*T] for up to `tree_size` nodes."""
        device = self.info.device
        return (aligned_empty(tree_size, torch.int64, device), aligned_empty(tree_size, torch.int64, device),
                aligned_empty(tree_size * tree_size, self.info.dtype, device))

    def _allocate_outputs(self, tree_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat output buffers for up to `tree_size` nodes: logits [T*V], new keys/values [L*T*Hkv*D]."""
        m = self.manifest.model
        kv = m.num_layers * tree_size * m.num_kv_heads * m.head_dim
        dtype, device = self.info.dtype, self.info.device
        return (aligned_empty(tree_size * m.vocab_size, dtype, device), aligned_empty(kv, dtype, device),
                aligned_empty(kv, dtype, device))

    # --- context calls -------------------------------------------------------------------------
    def _select_profile(self, t: int, s: int, stream: int) -> None:
        index = select_profile(self._profiles, t, s)
        if index == self._active_profile:
            return
        failed = f"TensorRT could not select optimization profile {index} ({self._profiles[index].name})"
        try:   # the bindings raise RuntimeError on failure (and document a False return)
            selected = self.context.set_optimization_profile_async(index, stream)
        except RuntimeError as exc:
            raise TrtRuntimeError(f"{failed}: {exc}: {self._logger.text()}") from exc
        if not selected:
            raise TrtRuntimeError(f"{failed}: {self._logger.text()}")
        self._active_profile = index
        self._bound.clear()          # bindings are invalidated by a profile switch: set them again

    def _set_shape(self, name: str, shape: list[int]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise TrtRuntimeError(f"TensorRT refused shape {shape} for {name} in profile "
                                  f"{self._profiles[self._active_profile].name}: {self._logger.text()}")

    def _set_address(self, name: str, address: int) -> None:
        if self._bound.get(name) == address:
            return
        check_address(name, address)
        if not self.context.set_tensor_address(name, address):
            raise TrtRuntimeError(f"TensorRT refused the address of {name}: {self._logger.text()}")
        self._bound[name] = address

    # --- the step ------------------------------------------------------------------------------
    def _check_shape(self, tree_size: int, past_length: int) -> None:
        self.manifest.check_step_shape(tree_size, past_length)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
             past_mask: torch.Tensor | None, past_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, s = len(ids), past_length
        m = self.manifest.model
        own = t > self._capacity      # a long prefill: buffers of its own for this step
        ids_in, positions_in, mask_in = self._allocate_inputs(t) if own else self._inputs
        logits, keys, values = self._allocate_outputs(t) if own else self._outputs
        ids_in, positions_in, mask_in = ids_in[:t], positions_in[:t], mask_in[: t * t].view(t, t)
        if self._past_mask.numel() < t * s:
            self._past_mask = aligned_empty(max(t * s, 2 * self._past_mask.numel()), self.info.dtype, self.info.device)
        past_in = self._past_mask[: t * s].view(t, s)
        # On the caller's stream, ordered after the last commit: device copies into the bound buffers.
        ids_in.copy_(ids)
        positions_in.copy_(positions)
        mask_in.copy_(tree_mask)
        if past_mask is None:
            past_in.zero_()
        else:
            past_in.copy_(past_mask)
        stream = self._enter_stream()
        try:
            self._select_profile(t, s, stream)
            self._bind_inputs(t, s, ids_in, positions_in, mask_in, past_in)
            for name, tensor in (("logits", logits), ("new_keys", keys), ("new_values", values)):
                self._set_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(stream):
                raise TrtRuntimeError(f"TensorRT execute_async_v3 failed (T={t}, S={s}): {self._logger.text()}")
        finally:
            self._leave_stream()
        new_shape = (m.num_layers, t, m.num_kv_heads, m.head_dim)
        n = math.prod(new_shape)
        return logits[: t * m.vocab_size].view(t, m.vocab_size), keys[:n].view(new_shape), values[:n].view(new_shape)

    def _bind_inputs(self, t: int, s: int, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     past_mask: torch.Tensor) -> None:
        m = self.manifest.model
        bound = [("input_ids", ids, [t]), ("position_ids", positions, [t]), ("tree_mask", mask, [t, t])]
        if "past_mask" in self.manifest.input_names:
            bound.append(("past_mask", past_mask, [t, s]))
        for name, tensor, shape in bound:
            self._set_shape(name, shape)
            self._set_address(name, tensor.data_ptr())
        past_shape = [s, m.num_kv_heads, m.head_dim]
        for name, address in self._past:
            self._set_shape(name, past_shape)
            self._set_address(name, address)    # S = 0: the block's own (valid, non-null) address

    def _enter_stream(self) -> int:
        """The stream handle the engine runs on: the backend's CUDA stream, after the caller's work."""
        if self._stream is None:
            return 0
        self._stream.wait_stream(torch.cuda.current_stream(self.info.device))
        return self._stream.cuda_stream

    def _leave_stream(self) -> None:
        """The caller's stream waits for the engine (readout and commits come after it)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.info.device).wait_stream(self._stream)

