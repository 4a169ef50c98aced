"""The reference backend: the StepModel in PyTorch, on CPU or CUDA."""

from __future__ import annotations

import torch

from export.step_model import StepModel
from runtime.backends.base import CacheOwner, ModelInfo, StepTensors
from runtime.backends.layouts import LayoutCache
from runtime.kv_cache import KVCache


class TorchBackend(CacheOwner):
    def __init__(self, model: StepModel, max_context: int, device: str | torch.device = "cpu",
                 max_batch: int = 1) -> None:
        """`max_batch`: sequences the cache holds at once (runtime.BatchGenerator), each up to max_context."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA device; use device='cpu'")
        self.model = model.to(device).eval()
        dtype = next(model.parameters()).dtype
        self.info = ModelInfo(model.vocab_size, model.num_extra_tokens, max_context, device, dtype, max_batch=max_batch,
                              sliding_window=model.family.sliding_window if model.family.has_sliding_layers else None)
        self._cache = KVCache(model.num_layers, max_context, model.num_kv_heads, model.head_dim, dtype, device,
                              capacity=max_context * max_batch)
        self._layouts = LayoutCache(device, dtype)

    def _release(self) -> None:
        self.model = None

    @torch.inference_mode()
    def _run(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past_keys, past_values = self._cache.past(inputs.past_length)
        return self.model(inputs.ids, inputs.positions, inputs.tree_mask, past_keys, past_values, inputs.past_mask,
                          *(inputs.sliding or ()))
