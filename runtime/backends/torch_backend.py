"""The reference backend: the StepModel in PyTorch, on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch

from export.step_model import StepModel, lowest_mask_value
from runtime.backends.base import ModelInfo, StepOutput
from runtime.kv_cache import KVCache


class TorchBackend:
    def __init__(self, model: StepModel, max_context: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA device; use device='cpu'")
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype
        self.info = ModelInfo(model.vocab_size, model.num_extra_tokens, max_context)
        self.cache = KVCache(model.num_layers, max_context, model.num_kv_heads, model.head_dim, self.dtype, self.device)
        self._mask_value = lowest_mask_value(self.dtype)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, ancestor_mask: np.ndarray) -> StepOutput:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)).to(self.device)
        visible = torch.tensor(ancestor_mask, dtype=torch.bool, device=self.device)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, self._mask_value)
        past_keys, past_values = self.cache.past()
        logits, new_keys, new_values = self.model(ids, pos, mask, past_keys, past_values)
        return StepOutput(logits, new_keys, new_values)
