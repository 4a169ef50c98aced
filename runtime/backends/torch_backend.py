"""The reference backend: the StepModel in PyTorch, on CPU or CUDA.

Dynamic steps (the CPU's default): each step at its own T over the cells in use. Static steps
(`step_sizes`, the default on CUDA): every step padded to one of a few T over every cell of the cache
(runtime/backends/packing.py), so the kernels are the same at every step of a size and, on CUDA, each
size's step is captured once as a CUDA graph and replayed: only the inputs are copied into the graph's
own buffers, and its outputs are read where it wrote them. Without graphs an eager step costs ~1,100
kernel launches, bound by the host (27 ms on an H200 for the 135M model, reports/gpu-check).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from export.step_model import StepModel
from runtime.backends.base import CacheOwner, ModelInfo, StepTensors
from runtime.backends.layouts import LayoutCache
from runtime.kv_cache import KVCache


class TorchBackend(CacheOwner):
    def __init__(self, model: StepModel, max_context: int, device: str | torch.device = "cpu",
                 max_batch: int = 1, step_sizes: Sequence[int] | None = None, cuda_graphs: bool | None = None) -> None:
        """`max_batch`: sequences the cache holds at once (runtime.BatchGenerator), each up to max_context.
        `step_sizes`: static steps of these T (None: dynamic). `cuda_graphs`: capture each static size's
        step (default: on CUDA with static steps)."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA device; use device='cpu'")
        sizes = None if step_sizes is None else tuple(sorted(set(int(s) for s in step_sizes)))
        self._graphs_on = (device.type == "cuda" and sizes is not None) if cuda_graphs is None else cuda_graphs
        if self._graphs_on and (device.type != "cuda" or sizes is None):
            raise ValueError("CUDA graphs need a CUDA device and static steps (step_sizes)")
        self.model = model.to(device).eval()
        dtype = next(model.parameters()).dtype
        self.info = ModelInfo(model.vocab_size, model.num_extra_tokens, max_context, device, dtype, max_batch=max_batch,
                              sliding_window=model.family.sliding_window if model.family.has_sliding_layers else None,
                              step_sizes=sizes)
        self._cache = KVCache(model.num_layers, max_context, model.num_kv_heads, model.head_dim, dtype, device,
                              capacity=max_context * max_batch)
        self._layouts = LayoutCache(device, dtype)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepTensors, tuple]] = {}   # T -> graph, inputs, outputs

    def _release(self) -> None:
        self._graphs.clear()
        self.model = None

    @torch.inference_mode()
    def _run(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._graphs_on:
            return self._replay(inputs)
        return self._forward(inputs)

    def _forward(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past_keys, past_values = self._cache.past(inputs.past_length)
        return self.model(inputs.ids, inputs.positions, inputs.tree_mask, past_keys, past_values, inputs.past_mask,
                          *(inputs.sliding or ()))

    def _replay(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's CUDA graph at this T (captured on first use): inputs copied into its buffers, replayed."""
        entry = self._graphs.get(inputs.size)
        if entry is None:
            entry = self._graphs[inputs.size] = self._capture(inputs)
        graph, buffers, outputs = entry
        for buffer, value in zip(buffers.static_tensors(), inputs.static_tensors()):
            buffer.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, inputs: StepTensors) -> tuple[torch.cuda.CUDAGraph, StepTensors, tuple]:
        """Buffers of this step's shapes, a warm-up on a side stream (lazy init, allocator), then the capture."""
        buffers = StepTensors(*(t.clone() for t in inputs.static_tensors()[:4]), inputs.past_length,
                              None if inputs.sliding is None else tuple(t.clone() for t in inputs.sliding))
        side = torch.cuda.Stream(self.info.device)
        side.wait_stream(torch.cuda.current_stream(self.info.device))
        with torch.cuda.stream(side):
            self._forward(buffers)
        torch.cuda.current_stream(self.info.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._forward(buffers)
        return graph, buffers, outputs

