"""The backend contract: a backend owns its KV cache and runs drafts; nothing else writes the cache.

    reset()                 forget the committed entries (a new sequence)
    step(draft)             one forward pass over the draft at the committed length: uploads the
                            token ids (the only per-step upload) and returns device-side results
    commit(nodes)           append the given nodes of the last step to the committed prefix
    length                  committed entries (read only)
    info                    static facts the runtime checks inputs against
    close()                 release the session / context and the cache (also on leaving a `with`
                            block); any later call is refused with BackendClosedError

A draft's layout (depths, additive mask, prediction rows) becomes device tensors once per layout
key (runtime/backends/layouts.py); `runtime.readout.read_step` then brings back, in one transfer,
what verification and the proposer need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from export.manifest import Manifest
from export.trt.key import DeviceFacts, EngineRecord
from runtime.backends.layouts import DeviceLayout, LayoutCache
from runtime.draft import Draft
from runtime.kv_cache import KVCache


ONNXRUNTIME, TENSORRT = "onnxruntime", "tensorrt"   # the runners of an exported graph


@dataclass(frozen=True)
class EngineGraph:
    """An exported step graph checked and ready to open: what a backend of an engine dir takes."""

    manifest: Manifest
    runner: str                          # ONNXRUNTIME or TENSORRT
    path: Path                           # the file the runner opens: an ONNX graph, or engine.plan
    max_context: int                     # cache entries the backend allocates (<= the manifest's)
    provider: str | None = None          # onnxruntime: the execution provider
    optimized: bool = False              # onnxruntime: `path` is the saved optimised graph (not optimised again)
    record: EngineRecord | None = None   # tensorrt: engine.json, checked against this machine
    facts: DeviceFacts | None = None     # tensorrt: the device it was checked against


# An exported graph's float dtype (manifest.json's "dtype") as torch's: the device buffers bound to it.
MANIFEST_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the loaded step model that the runtime checks inputs against."""

    vocab_size: int
    num_extra_tokens: int  # ids vocab_size .. vocab_size + num_extra_tokens - 1 are method tokens
    max_context: int
    device: torch.device
    dtype: torch.dtype
    # torch threads for the host-side readout of a step (argmax / sampling over [C, V]); None = torch's
    # own setting. An engine computing outside torch on the CPU sets 1: after a parallel op torch's
    # OpenMP workers spin-wait, and they steal the cores from the engine's threads in the next step.
    readout_threads: int | None = None
    # sha256 of the exported graph the backend runs (its manifest's model.onnx); None for the torch step.
    # Profiles and statistics record it, so `trees build` notices when an engine's graph has changed.
    graph_sha256: str | None = None


@dataclass(frozen=True)
class StepOutput:
    """Device-side results of one step, valid until the next `step`."""

    logits: torch.Tensor         # [T, V]
    positions: torch.Tensor      # [T] int64 absolute positions of the nodes
    layout: DeviceLayout


class BackendClosedError(RuntimeError):
    """A backend used after close()."""


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

    def close(self) -> None:
        ...

    def __enter__(self) -> "Backend":
        ...

    def __exit__(self, *exc_info: object) -> None:
        ...


class CacheOwner:
    """The cache half of the contract, shared by the backends: the committed KVCache and the last
    step's new entries ([L, T, Hkv, D] each), from which `commit` appends the accepted nodes."""

    _cache: KVCache
    _layouts: LayoutCache
    _new_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    _closed: bool = False

    def _start_step(self, draft: Draft, check_shape: Callable[[int, int], None] | None = None) -> DeviceLayout:
        """Refuse a draft the engine's shapes (`check_shape(T, S)`, e.g. Manifest.check_step_shape) or
        the cache cannot take, before any work; the draft layout's device tensors."""
        self._check_open()
        if check_shape is not None:
            check_shape(draft.size, self._cache.length)
        self._cache.check_room(draft.size)
        return self._layouts.get(draft.layout)

    @property
    def length(self) -> int:
        self._check_open()
        return self._cache.length

    def reset(self) -> None:
        self._check_open()
        self._cache.reset()
        self._new_kv = None

    def commit(self, nodes: Sequence[int]) -> None:
        self._check_open()
        if self._new_kv is None:
            raise RuntimeError("commit() needs a step() first")
        self._cache.commit(*self._new_kv, nodes)

    # --- lifetime --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"this {type(self).__name__} was closed: its session and cache are released; "
                                     "load the engine again to run more steps")

    def _release(self) -> None:
        """The runner's own resources (a session, an engine context, a stream), dropped by close()."""

    def close(self) -> None:
        """Release the runner's resources and the KV cache now, not whenever the garbage collector runs
        (a service that reloads models would otherwise hold every old session). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()
        self._cache = self._layouts = self._new_kv = None  # type: ignore[assignment]

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
