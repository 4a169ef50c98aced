"""The backend contract: a backend owns its KV cache and runs drafts; nothing else writes the cache.

    reset()                 forget the committed entries (a new sequence)
    step(draft)             one forward pass over the draft at the committed length: uploads the
                            token ids (the only per-step upload) and returns device-side results
    commit(nodes)           append the given nodes of the last step to the committed prefix
    length                  committed entries (read only)
    info                    static facts the runtime checks inputs against

A draft's layout (depths, additive mask, prediction rows) becomes device tensors once per layout
key (runtime/backends/layouts.py); `runtime.readout.read_step` then brings back, in one transfer,
what verification and the proposer need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from runtime.draft import Draft
from runtime.kv_cache import KVCache


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the loaded step model that the runtime checks inputs against."""

    vocab_size: int
    num_extra_tokens: int  # ids vocab_size .. vocab_size + num_extra_tokens - 1 are method tokens
    max_context: int
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class DeviceLayout:
    """A Layout's tensors on the backend's device, built once per layout key."""

    depth: torch.Tensor          # [T] int64
    mask: torch.Tensor           # [T, T] additive (0 = visible, dtype's lowest finite value = hidden)
    predict_rows: torch.Tensor   # [G, k] int64


@dataclass(frozen=True)
class StepOutput:
    """Device-side results of one step, valid until the next `step`."""

    logits: torch.Tensor         # [T, V]
    positions: torch.Tensor      # [T] int64 absolute positions of the nodes
    layout: DeviceLayout


class Backend(Protocol):
    info: ModelInfo

    @property
    def length(self) -> int:
        ...

    def reset(self) -> None:
        ...

    def step(self, draft: Draft) -> StepOutput:
        ...

    def commit(self, nodes: Sequence[int]) -> None:
        ...


class CacheOwner:
    """The cache half of the contract, shared by the backends: the committed KVCache and the last
    step's new entries ([L, T, Hkv, D] each), from which `commit` appends the accepted nodes."""

    _cache: KVCache
    _new_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return self._cache.length

    def reset(self) -> None:
        self._cache.reset()
        self._new_kv = None

    def commit(self, nodes: Sequence[int]) -> None:
        if self._new_kv is None:
            raise RuntimeError("commit() needs a step() first")
        self._cache.commit(*self._new_kv, nodes)
