"""What the decode loop needs from a backend: one step over a tree, and the cache it commits to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from runtime.kv_cache import KVCache


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the loaded step model that the runtime checks inputs against."""

    vocab_size: int
    num_extra_tokens: int  # ids vocab_size .. vocab_size + num_extra_tokens - 1 are method tokens
    max_context: int


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor      # [T, V]
    new_keys: torch.Tensor    # [L, T, Hkv, D]
    new_values: torch.Tensor  # [L, T, Hkv, D]


class Backend(Protocol):
    info: ModelInfo
    cache: KVCache
    device: torch.device

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, ancestor_mask: np.ndarray) -> StepOutput:
        """input_ids, position_ids: [T] int64; ancestor_mask: [T, T] bool (True = may attend)."""
        ...
