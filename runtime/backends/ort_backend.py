"""The onnxruntime backend: runs an exported step graph on the CPU or CUDA execution provider. It only
opens and runs: exporting and optimising engines is export/'s job (`export.engine.prepare_engine`), and
choosing and checking the graph file the loader's (runtime/loading.py onnxruntime_graph); given a dir
without its optimised graph, the plain export is optimised in memory, never written.

Nothing proportional to the cache is copied per step. IOBinding binds
  - past_key.{i} / past_value.{i} to the KVCache's own layer-major storage: the committed prefix
    of layer i is the contiguous [S, Hkv, D] block at keys[i].data_ptr(), so only S changes;
  - tree_mask to the layout's cached additive mask, position_ids to a per-step device add;
  - logits / new_keys / new_values to buffers preallocated for the largest decode tree, which the
    graph writes densely at their real shape (views of the flat buffers).
So a StepOutput is valid until the next `step`. A prefill longer than the decode buffers gets
buffers of its own for that one step.

Static steps (`step_sizes`, the default on CUDA; runtime/backends/packing.py): every step is padded to
one of a few T over every cell of the cache, and each size has an IOBinding of its own whose every
address is fixed: inputs copied into views of buffers for the largest size, outputs written into
others. On CUDA the session runs with the CUDA EP's `enable_cuda_graph` (a graph per size, chosen by the
run option `gpu_graph_id`) on a stream of the backend's own, ordered after and before the caller's
(runtime/backends/streams.py); the graph must then run every node on the CUDA EP, which the shape-free
GPU export gives (export/attention.py).

Session options (measured on the 2-core CPU, see README): intra-op threads = all cores, spinning
during a run only (OrtOptions.spin), graph optimisation 'extended' (saved once by export/ort_optimize.py, reloaded with
optimisations off, which turns a multi-second session start into well under one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from export.ort_optimize import graph_optimization_level
from runtime.backends.base import MANIFEST_TORCH_DTYPES, CacheOwner, EngineGraph, ModelInfo, StepTensors
from export.manifest import TREE_AXIS, ShapeError
from runtime.backends.layouts import LayoutCache
from runtime.backends.streams import CudaStreams, NoStreams, Streams
from runtime.kv_cache import KVCache


@dataclass(frozen=True)
class OrtOptions:
    threads: int | None = None           # intra-op threads; None = onnxruntime's default (one per core)
    optimization: str = "extended"       # graph optimisation level (of the saved graph, or in memory)
    # Intra-op threads busy-wait between the ops of a run and stop when it returns (allow_spinning +
    # force_spinning_stop), so they never take the core from the host's work between steps. Measured
    # 2026-12-01 (HumanEval x 10, 128 tokens, a process per run, 3 rounds, medians): int4 vanilla
    # 77.6 -> 91.9 tokens/s against no spinning, int4 hybrid 93.4 -> 106.8; spinning that goes on after
    # the run (onnxruntime's default) gave hybrid 85.6-105.3, its host work competing with the spin.
    spin: bool = True


def ort_session_options(options: OrtOptions, optimization: str):
    """onnxruntime SessionOptions for `options` (threads, spinning) at graph optimisation `optimization`."""
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    if options.threads is not None:
        session_options.intra_op_num_threads = options.threads
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    session_options.add_session_config_entry("session.force_spinning_stop", "1")
    session_options.graph_optimization_level = graph_optimization_level(optimization)
    return session_options


class OrtBackend(CacheOwner):
    def __init__(self, graph: EngineGraph, device: str | torch.device = "cpu", options: OrtOptions = OrtOptions(),
                 max_batch: int = 1, step_sizes: Sequence[int] | None = None) -> None:
        """Open the onnxruntime session of a checked graph (runtime/loading.py onnxruntime_graph) and
        allocate the cache (`max_batch` sequences of up to max_context each) and the output buffers.
        `step_sizes`: static steps of these T (None: dynamic steps)."""
        import onnxruntime as ort

        self.manifest = graph.manifest
        self.graph_path = graph.path   # the graph file this backend runs
        device = torch.device(device)
        sizes = None if step_sizes is None else tuple(sorted(set(int(t) for t in step_sizes)))
        self._streams: Streams = CudaStreams(device) if device.type == "cuda" and sizes else NoStreams()
        # A saved optimised graph is loaded as is; the plain export gets optimised in memory.
        session_options = ort_session_options(options, "disable" if graph.optimized else options.optimization)
        provider: Any = graph.provider
        if isinstance(self._streams, CudaStreams):   # static steps on our own stream; CUDA graphs when every
            provider = (graph.provider, {                # node can run on the device (a shape-free export)
                "device_id": str(device.index or 0), "has_user_compute_stream": "1",
                "user_compute_stream": str(self._streams.stream.cuda_stream),
                "enable_cuda_graph": "1" if self.manifest.shape_free else "0"})
        self.session = ort.InferenceSession(str(graph.path), session_options, providers=[provider])
        m = self.manifest.model
        dtype = MANIFEST_TORCH_DTYPES[self.manifest.dtype]
        max_context = graph.max_context
        # One torch thread for the readout on the CPU (ModelInfo.readout_threads; measured on the 2-core
        # CPU: sampled vanilla 49.5 -> 54.3 tokens/s, the readout itself is small).
        self.info = ModelInfo(m.vocab_size, self.manifest.method.num_extra_tokens, max_context, device, dtype,
                              readout_threads=1 if device.type == "cpu" else None,
                              graph_sha256=self.manifest.onnx.sha256, max_batch=max_batch,
                              sliding_window=m.sliding_window if m.sliding_mask_inputs else None, step_sizes=sizes)
        self._cache = KVCache(m.num_layers, max_context, m.num_kv_heads, m.head_dim, dtype, device,
                              capacity=max_context * max_batch)
        self._layouts = LayoutCache(device, dtype)
        self._np_dtype = np.dtype(self.manifest.dtype)
        self._binding = self.session.io_binding()
        self._device_id = device.index or 0
        self._capacity = self.manifest.max_tree * max_batch
        self._outputs = self._allocate(self._capacity)
        # Layer i's bound cells start at its layer's first row: these addresses never change.
        self._past = [(f"past_key.{i}", k.data_ptr()) for i, k in enumerate(self._cache.keys)] + \
                     [(f"past_value.{i}", v.data_ptr()) for i, v in enumerate(self._cache.values)]
        self._visible = torch.zeros(0, dtype=dtype, device=device)   # an all-visible past mask, grown as needed
        self._step_inputs: tuple[torch.Tensor, ...] = ()  # keeps the bound inputs alive until the next step
        # Steps smaller than the graph's minimum run padded (Manifest.min_step_rows, runtime/backends/packing.py).
        self._min_rows = self.manifest.min_step_rows
        self._static = {} if sizes is None else self._bind_static(sizes)   # T -> its StaticBinding

    def _release(self) -> None:
        self._static = {}
        self.session = self._binding = None
        self._outputs = self._step_inputs = ()
        self._visible = None
        self._past = []

    def _check_shape(self, tree_size: int, past_length: int) -> None:
        if self._static:   # sizes and cells were checked against the graph once, at construction
            if tree_size not in self._static or past_length != self._cache.capacity:
                raise ShapeError(f"a static step is one of T={list(self._static)} over all "
                                 f"{self._cache.capacity} cells, not T={tree_size} over {past_length}")
            return
        self.manifest.check_step_shape(tree_size, past_length)

    def _bind_static(self, sizes: tuple[int, ...]) -> dict[int, "StaticBinding"]:
        """An IOBinding per static size over views of one set of buffers for the largest size: each size's
        addresses never change (what a CUDA graph replays), and only one step's outputs live at a time."""
        import onnxruntime as ort

        largest_tree = max(axes[TREE_AXIS].max for axes in self.manifest.profiles.values())
        if sizes[0] < self._min_rows or sizes[-1] > largest_tree:
            raise ShapeError(f"{self.manifest.dir} takes steps of {self._min_rows}..{largest_tree} nodes, not static "
                             f"sizes {list(sizes)}: re-export with a larger --max-tree")
        m, t_max, cells = self.manifest.model, sizes[-1], self._cache.capacity
        dtype, device = self.info.dtype, self.info.device
        flat = [torch.zeros(t_max, dtype=torch.int64, device=device), torch.zeros(t_max, dtype=torch.int64, device=device),
                torch.zeros(t_max * t_max, dtype=dtype, device=device), torch.zeros(t_max * cells, dtype=dtype, device=device)]
        if m.sliding_mask_inputs:
            flat += [torch.zeros(t_max * t_max, dtype=dtype, device=device),
                     torch.zeros(t_max * cells, dtype=dtype, device=device)]
        outputs = self._outputs if t_max <= self._capacity else self._allocate(t_max)
        names = ["input_ids", "position_ids", "tree_mask", "past_mask", *m.sliding_mask_inputs]
        bound = {}
        for index, t in enumerate(sizes):
            widths = [(), (), (t,), (cells,), (t,), (cells,)]   # each input's shape after its T
            views = [buffer[: t * (w[0] if w else 1)].view(t, *w) for buffer, w in zip(flat, widths)]
            binding = self.session.io_binding()
            for name, view in zip(names, views):
                self._bind(name, view, tuple(view.shape), binding=binding)
            for name, address in self._past:
                binding.bind_input(name, device.type, self._device_id, self._np_dtype,
                                   [cells, m.num_kv_heads, m.head_dim], address)
            shapes = [(t, m.vocab_size), (m.num_layers, t, m.num_kv_heads, m.head_dim)]
            readout = [o[: int(np.prod(shape))].view(shape) for o, shape in zip(outputs, shapes + shapes[1:])]
            for name, view in zip(("logits", "new_keys", "new_values"), readout):
                self._bind(name, view, tuple(view.shape), output=True, binding=binding)
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(index + 1))   # graph ids of the CUDA EP: >= 1
            bound[t] = StaticBinding(binding, views, tuple(readout), run_options)
        return bound

    def _allocate(self, tree_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat output buffers for up to `tree_size` nodes: logits [T*V], new keys/values [L*T*Hkv*D]."""
        m = self.manifest.model
        kv = m.num_layers * tree_size * m.num_kv_heads * m.head_dim
        dtype, device = self.info.dtype, self.info.device
        return (torch.empty(tree_size * m.vocab_size, dtype=dtype, device=device),
                torch.empty(kv, dtype=dtype, device=device), torch.empty(kv, dtype=dtype, device=device))

    def _bind(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...], output: bool = False,
              binding: Any = None) -> None:
        binding = self._binding if binding is None else binding
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.info.device.type, self._device_id,
             self._np_dtype if tensor.is_floating_point() else np.int64, list(shape), tensor.data_ptr())

    def _all_visible(self, t: int, s: int) -> torch.Tensor:
        """A [t, s] past mask of zeros: a view of one zero buffer (grown, never rebuilt per step)."""
        if self._visible.numel() < t * s:
            self._visible = torch.zeros(max(t * s, 2 * self._visible.numel()), dtype=self.info.dtype,
                                        device=self.info.device)
        return self._visible[: t * s].view(t, s)

    def _run(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._static:
            return self._run_static(inputs)
        t, s = inputs.size, inputs.past_length
        m = self.manifest.model
        past_mask = self._all_visible(t, s) if inputs.past_mask is None else inputs.past_mask
        self._bind("input_ids", inputs.ids, (t,))
        self._bind("position_ids", inputs.positions, (t,))
        self._bind("tree_mask", inputs.tree_mask, (t, t))
        self._bind("past_mask", past_mask, (t, s))
        for name, mask in zip(m.sliding_mask_inputs, inputs.sliding or ()):
            self._bind(name, mask, tuple(mask.shape))
        past_shape = [s, m.num_kv_heads, m.head_dim]
        for name, address in self._past:
            self._binding.bind_input(name, self.info.device.type, self._device_id, self._np_dtype, past_shape, address)
        self._step_inputs = (inputs, past_mask)
        logits, keys, values = self._outputs if t <= self._capacity else self._allocate(t)  # long prefill: own buffers
        new_shape = (m.num_layers, t, m.num_kv_heads, m.head_dim)
        self._bind("logits", logits, (t, m.vocab_size), output=True)
        self._bind("new_keys", keys, new_shape, output=True)
        self._bind("new_values", values, new_shape, output=True)
        self._binding.synchronize_inputs()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        n = new_shape[0] * t * new_shape[2] * new_shape[3]
        return logits[: t * m.vocab_size].view(t, m.vocab_size), keys[:n].view(new_shape), values[:n].view(new_shape)

    def _run_static(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy the step's inputs into its size's buffers (the caller's stream), run that size's binding
        (on CUDA: its graph, on our stream, ordered after the copies and before the readout)."""
        bound = self._static[inputs.size]
        for buffer, value in zip(bound.inputs, inputs.static_tensors()):
            buffer.copy_(value)
        self._streams.engine_stream()
        self.session.run_with_iobinding(bound.binding, bound.run_options)
        self._streams.engine_done()
        return bound.outputs


@dataclass(frozen=True)
class StaticBinding:
    """One static step size's IOBinding, every address fixed: what a CUDA graph of it replays."""

    binding: Any                                                   # onnxruntime IOBinding
    inputs: list[torch.Tensor]                                     # views bound: ids, positions, masks
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]       # logits [T, V], new keys/values [L, T, Hkv, D]
    run_options: Any                                               # onnxruntime RunOptions (gpu_graph_id)
