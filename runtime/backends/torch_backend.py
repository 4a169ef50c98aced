"""The reference backend: the StepModel in PyTorch, on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch

from export.step_model import StepModel
from runtime.backends.base import CacheOwner, ModelInfo, StepOutput
from runtime.backends.layouts import LayoutCache
from runtime.draft import Draft
from runtime.kv_cache import KVCache


class TorchBackend(CacheOwner):
    def __init__(self, model: StepModel, max_context: int, device: str | torch.device = "cpu") -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA device; use device='cpu'")
        self.model = model.to(device).eval()
        dtype = next(model.parameters()).dtype
        self.info = ModelInfo(model.vocab_size, model.num_extra_tokens, max_context, device, dtype)
        self._cache = KVCache(model.num_layers, max_context, model.num_kv_heads, model.head_dim, dtype, device)
        self._layouts = LayoutCache(device, dtype)

    def _release(self) -> None:
        self.model = None

    @torch.inference_mode()
    def step(self, draft: Draft) -> StepOutput:
        layout = self._start_step(draft)
        ids = torch.from_numpy(np.ascontiguousarray(draft.tokens, dtype=np.int64)).to(self.info.device)  # the upload
        positions = layout.depth + self._cache.length
        past_keys, past_values = self._cache.past()
        logits, new_keys, new_values = self.model(ids, positions, layout.mask, past_keys, past_values)
        self._new_kv = (new_keys, new_values)
        return StepOutput(logits, positions, layout)
