"""The onnxruntime backend: an exported step graph (manifest dir) on the CPU or CUDA execution provider.

Nothing proportional to the cache is copied per step. IOBinding binds
  - past_key.{i} / past_value.{i} to the KVCache's own layer-major storage: the committed prefix
    of layer i is the contiguous [S, Hkv, D] block at keys[i].data_ptr(), so only the pointer and S
    change from step to step;
  - logits / new_keys / new_values to buffers preallocated for the largest decode tree, which the
    graph writes in place; StepOutput holds torch views of them.
So a StepOutput is valid until the next `step` (the decode loop commits and observes before then).
A prefill longer than the decode buffers gets buffers of its own for that one step.

Session options (measured on the 2-core CPU, see README): intra-op threads = all cores, graph
optimisation 'extended', and the optimised graph saved beside the export (export/ort_optimize.py)
and reloaded with optimisations off, which turns a multi-second session start into well under one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from export.engine import engine_dir, ensure_export
from export.manifest import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE, Manifest, ManifestError, check_file
from export.onnx_export import EXPORT_METHODS, ExportConfig, MethodExtras, ht_options
from export.ort_optimize import graph_optimization_level, optimize_for_ort, usable_optimized_model
from export.step_model import lowest_mask_value
from runtime.backends.base import ModelInfo, StepOutput
from runtime.kv_cache import KVCache

if TYPE_CHECKING:
    from runtime.methods import Method

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class OrtOptions:
    threads: int | None = None           # intra-op threads; None = onnxruntime's default (one per core)
    optimization: str = "extended"       # graph optimisation level used to build the optimised graph
    save_optimized: bool = True          # write the optimised graph beside the export when missing
    spin: bool = False                   # intra-op threads busy-wait after a run (onnxruntime's default: on)


class OrtBackend:
    def __init__(self, engine: Manifest | str | Path, device: str | torch.device = "cpu",
                 max_context: int | None = None, options: OrtOptions = OrtOptions()) -> None:
        import onnxruntime as ort

        # Files are hashed when a graph is opened (_open_session): only the ones actually run.
        self.manifest = engine if isinstance(engine, Manifest) else Manifest.load(engine, verify_files=False)
        self.device = torch.device(device)
        provider = PROVIDERS.get(self.device.type)
        if provider is None or provider not in ort.get_available_providers():
            raise ValueError(f"device {self.device} needs onnxruntime's {provider or 'matching'} execution provider; "
                             f"this onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())}"
                             + (" (install onnxruntime-gpu for CUDA)" if self.device.type == "cuda" else ""))
        max_context = self.manifest.max_context if max_context is None else max_context
        if max_context > self.manifest.max_context:
            raise ManifestError(f"max_context {max_context} exceeds the engine's {self.manifest.max_context} "
                                f"({self.manifest.dir}); re-export with --max-context {max_context}")
        self.session = self._open_session(provider, options)
        m = self.manifest.model
        self.dtype = TORCH_DTYPES[self.manifest.dtype]
        self.info = ModelInfo(m.vocab_size, self.manifest.method.num_extra_tokens, max_context)
        self.cache = KVCache(m.num_layers, max_context, m.num_kv_heads, m.head_dim, self.dtype, self.device)
        self._np_dtype = np.dtype(self.manifest.dtype)
        self._mask_value = lowest_mask_value(self.dtype)
        self._binding = self.session.io_binding()
        self._device_id = self.device.index or 0
        self._capacity = self.manifest.max_tree
        self._logits, self._keys, self._values = self._allocate(self._capacity)
        # Layer i's committed prefix starts at its layer's first row: these addresses never change.
        self._past = [(f"past_key.{i}", k.data_ptr()) for i, k in enumerate(self.cache.keys)] + \
                     [(f"past_value.{i}", v.data_ptr()) for i, v in enumerate(self.cache.values)]
        self._step_inputs: tuple[torch.Tensor, ...] = ()  # keeps the bound small inputs alive until the next step

    def _open_session(self, provider: str, options: OrtOptions):
        import onnxruntime as ort

        path = usable_optimized_model(self.manifest, provider, options.optimization)
        if path is None:
            for record in (self.manifest.onnx, *self.manifest.external_data):
                check_file(self.manifest.dir, record)
        if path is None and options.save_optimized:
            self.manifest = optimize_for_ort(self.manifest, provider, options.optimization)
            path = usable_optimized_model(self.manifest, provider, options.optimization)
        session_options = ort.SessionOptions()
        if options.threads is not None:
            session_options.intra_op_num_threads = options.threads
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
        # An optimised graph is loaded as is; the plain export gets optimised in memory.
        session_options.graph_optimization_level = graph_optimization_level(
            "disable" if path is not None else options.optimization)
        return ort.InferenceSession(str(path or self.manifest.onnx_path), session_options, providers=[provider])

    def _allocate(self, tree_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat output buffers for up to `tree_size` nodes: logits [T*V], new keys/values [L*T*Hkv*D]."""
        m = self.manifest.model
        kv = m.num_layers * tree_size * m.num_kv_heads * m.head_dim
        empty = lambda n: torch.empty(n, dtype=self.dtype, device=self.device)  # noqa: E731
        return empty(tree_size * m.vocab_size), empty(kv), empty(kv)

    def _bind(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...], output: bool = False) -> None:
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, self.device.type, self._device_id, self._np_dtype if tensor.is_floating_point() else np.int64,
             list(shape), tensor.data_ptr())

    def _bind_past(self, length: int) -> None:
        shape = [length, self.manifest.model.num_kv_heads, self.manifest.model.head_dim]
        for name, address in self._past:
            self._binding.bind_input(name, self.device.type, self._device_id, self._np_dtype, shape, address)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, ancestor_mask: np.ndarray) -> StepOutput:
        t, s = len(input_ids), self.cache.length
        self.manifest.check_step_shape(t, s)
        m = self.manifest.model
        # Small per-step inputs (T and T*T elements), copied: tree buffers are read-only arrays.
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(position_ids, dtype=torch.int64, device=self.device)
        visible = torch.tensor(ancestor_mask, dtype=torch.bool, device=self.device)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, self._mask_value)
        self._bind("input_ids", ids, (t,))
        self._bind("position_ids", pos, (t,))
        self._bind("tree_mask", mask, (t, t))
        self._bind_past(s)
        self._step_inputs = (ids, pos, mask)
        logits, keys, values = self._logits, self._keys, self._values
        if t > self._capacity:  # a long prefill: buffers for this step only
            logits, keys, values = self._allocate(t)
        new_shape = (m.num_layers, t, m.num_kv_heads, m.head_dim)
        self._bind("logits", logits, (t, m.vocab_size), output=True)
        self._bind("new_keys", keys, new_shape, output=True)
        self._bind("new_values", values, new_shape, output=True)
        self._binding.synchronize_inputs()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        n = new_shape[0] * t * new_shape[2] * new_shape[3]
        return StepOutput(logits[: t * m.vocab_size].view(t, m.vocab_size),
                          keys[:n].view(new_shape), values[:n].view(new_shape))


def ensure_engine(model_dir: str | Path, method: "Method", device: str | torch.device = "cpu",
                  max_context: int = DEFAULT_MAX_CONTEXT) -> Manifest:
    """The engine dir for `model_dir` + `method` on `device`: artifacts/engines/<model>/<cpu|cuda>/<graph>/,
    exported (and validated) when missing or stale. The graph is `vanilla` for methods without trained
    tensors (vanilla, ngram share it), `ppd` or `ht` otherwise, keyed by the tensors' hash."""
    graph, options = graph_method(method)
    config = ExportConfig(Path(model_dir), engine_dir(model_dir, torch.device(device).type, graph), method=graph,
                          checkpoint=None if graph == "vanilla" else method.checkpoint,
                          max_context=max_context, max_tree=max(DEFAULT_MAX_TREE, method.proposer.max_draft_tokens))
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731  (stdout is the generated text)
    extras = MethodExtras(method.extra_embeddings, options, method.transfer_maps)
    return ensure_export(config, extras, log=log, verify_files=False).manifest


def graph_method(method: "Method") -> tuple[str, dict]:
    """Which exported graph serves `method`, and the options recorded with it."""
    if method.extra_embeddings is None and method.transfer_maps is None:
        return "vanilla", {}
    if method.name == "ppd" and method.extra_embeddings is not None:
        config = method.proposer.config
        return "ppd", {"num_prompt_tokens": config.num_prompt_tokens, "ensemble": config.ensemble}
    if method.name == "ht" and method.transfer_maps is not None:
        return "ht", ht_options(method.transfer_maps)
    raise ValueError(f"method {method.name!r} brings trained tensors but has no ONNX export; "
                     f"exportable: {', '.join(EXPORT_METHODS)}")
