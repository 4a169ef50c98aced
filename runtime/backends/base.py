"""The backend contract: a backend owns its KV cache and runs drafts; nothing else writes the cache.

One sequence (runtime.Generator):
    reset()                 forget the committed entries (a new sequence)
    step(draft)             one forward pass over the draft at the committed length: uploads the
                            token ids (the only per-step upload) and returns device-side results
    commit(nodes)           append the given nodes of the last step to the committed prefix
    length                  committed entries (read only)
Many sequences in one step (runtime.BatchGenerator):
    open_sequence() -> slot, close_sequence(slot), sequence_length(slot)
    step_batch([(slot, draft)]) -> [StepOutput]     one forward pass over every draft, packed
    commit_batch([(slot, nodes)])                     each sequence's accepted nodes of that pass
Both:
    info                    static facts the runtime checks inputs against
    close()                 release the session / context and the cache (also on leaving a `with`
                            block); any later call is refused with BackendClosedError

A draft's layout (depths, additive mask, prediction rows) becomes device tensors once per layout
key (runtime/backends/layouts.py); several drafts are packed into one step by
runtime/backends/packing.py. `runtime.readout.read_step` then brings back, in one transfer per
draft, what verification and the proposer need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from export.manifest import Manifest
from export.masks import lowest_mask_value, sliding_window_masks
from export.trt.key import DeviceFacts, EngineRecord
from runtime.backends.layouts import DeviceLayout, LayoutCache
from runtime.backends.packing import StepPlan, plan_step
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
    max_batch: int = 1     # sequences whose cache cells fit at once (each up to max_context)
    sliding_window: int | None = None   # the model's sliding-window layers see this far back (None: none slide)
    # Static steps (GPU engines: CUDA graphs, TensorRT): every step runs at one of these T, padded, over
    # all the cache's cells; a longer draft is refused, so the generators cut prefills into chunks that fit
    # (StaticSteps). None: each step at its own T over the cells in use (the CPU).
    step_sizes: tuple[int, ...] | None = None

    @property
    def max_step_tokens(self) -> int | None:
        """The most nodes one step may hold (static steps), or None (any)."""
        return None if self.step_sizes is None else max(self.step_sizes)


@dataclass(frozen=True)
class StepTensors:
    """One step's inputs on the backend's device, what `_run` binds (runtime/backends/packing.py)."""

    ids: torch.Tensor                   # [T] int64
    positions: torch.Tensor             # [T] int64 absolute positions
    tree_mask: torch.Tensor             # [T, T] additive
    past_mask: torch.Tensor | None      # [T, S] additive; None: every bound cell visible to every row
    past_length: int                    # S: the cache cells bound
    sliding: tuple[torch.Tensor, torch.Tensor] | None = None   # sliding_tree_mask [T, T], sliding_past_mask [T, S]

    @property
    def size(self) -> int:
        return len(self.ids)

    def static_tensors(self) -> list[torch.Tensor]:
        """A static step's inputs in the one order its buffers keep: ids, positions, tree_mask, past_mask,
        the sliding masks (a static step always has its past mask: runtime/backends/packing.py)."""
        if self.past_mask is None:
            raise ValueError("a static step has a past mask: plan it with a static shape")
        return [self.ids, self.positions, self.tree_mask, self.past_mask, *(self.sliding or ())]


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


class BatchBackend(Backend, Protocol):
    """A backend that also steps many sequences at once (every backend of this package)."""

    def open_sequence(self) -> int:
        ...

    def close_sequence(self, slot: int) -> None:
        ...

    def sequence_length(self, slot: int) -> int:
        ...

    def step_batch(self, drafts: Sequence[tuple[int, Draft]]) -> list[StepOutput]:
        ...

    def commit_batch(self, accepted: Sequence[tuple[int, Sequence[int]]]) -> None:
        ...


class CacheOwner:
    """What the backends share: the KV cache and its sequences, packing drafts into one step
    (runtime/backends/packing.py) and committing the accepted rows of the last step. A backend adds
    `_run`: one forward pass over packed device inputs."""

    _cache: KVCache
    _layouts: LayoutCache
    _last: tuple[StepPlan, torch.Tensor, torch.Tensor] | None = None   # the last step's plan, new keys, values
    _solo: int | None = None         # the sequence of the one-sequence API
    _min_rows: int = 1               # fewest rows a step runs with (Manifest.min_step_rows)
    _closed: bool = False

    def _check_shape(self, tree_size: int, past_length: int) -> None:
        """Refuse a packed step the engine's shapes cannot take (e.g. Manifest.check_step_shape)."""

    def _run(self, inputs: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass -> logits [T, V], new keys and values [L, T, Hkv, D] (valid until the next step)."""
        raise NotImplementedError

    # --- one sequence --------------------------------------------------------------------------------
    def _solo_slot(self) -> int:
        self._check_open()
        if self._solo is None:
            self._solo = self._cache.open()
        return self._solo

    @property
    def length(self) -> int:
        return self._cache.length(self._solo_slot())

    def reset(self) -> None:
        self._check_open()
        self._cache.reset()
        self._solo, self._last = None, None

    def step(self, draft: Draft) -> StepOutput:
        return self.step_batch([(self._solo_slot(), draft)])[0]

    def commit(self, nodes: Sequence[int]) -> None:
        self.commit_batch([(self._solo_slot(), nodes)])

    # --- many sequences ------------------------------------------------------------------------------
    def open_sequence(self) -> int:
        self._check_open()
        return self._cache.open()

    def close_sequence(self, slot: int) -> None:
        """Free the sequence's cells at once; no other sequence's cells move."""
        self._check_open()
        self._cache.close(slot)

    def sequence_length(self, slot: int) -> int:
        self._check_open()
        return self._cache.length(slot)

    def step_batch(self, drafts: Sequence[tuple[int, Draft]]) -> list[StepOutput]:
        """One forward pass over every (slot, draft), each seeing only its own sequence; one StepOutput per
        draft (views of the step's outputs, valid until the next step)."""
        self._check_open()
        if not drafts:
            raise ValueError("a step needs at least one draft")
        if len({slot for slot, _ in drafts}) != len(drafts):
            raise ValueError("a step takes at most one draft per sequence")
        for slot, draft in drafts:
            self._cache.check_room(slot, draft.size)
        plan = plan_step(drafts, self._cache, lowest_mask_value(self.info.dtype), self._min_rows,
                         self._static_shape(sum(draft.size for _, draft in drafts)))
        self._check_shape(plan.size, plan.past_length)
        layouts = [self._layouts.get(draft.layout) for _, draft in drafts]
        device = self.info.device
        ids = torch.from_numpy(plan.tokens).to(device)          # the upload
        if plan.tree_mask is None:   # a lone sequence: its layout's cached mask and depths
            (slot, draft), = drafts
            tree_mask, past_mask = layouts[0].mask, None
            positions = layouts[0].depth + self._cache.length(slot)
        else:
            tree_mask = torch.from_numpy(plan.tree_mask).to(device, self.info.dtype)
            past_mask = torch.from_numpy(plan.past_mask).to(device, self.info.dtype)
            positions = torch.from_numpy(plan.positions).to(device)
        sliding = None
        if self.info.sliding_window is not None:   # the window over each cell's own position (runtime/kv_cache.py)
            past_positions = torch.from_numpy(self._cache.positions[: plan.past_length]).to(device)
            sliding = sliding_window_masks(tree_mask, positions, past_positions, self.info.sliding_window, past_mask,
                                           self.info.dtype)
        inputs = StepTensors(ids, positions, tree_mask, past_mask, plan.past_length, sliding)
        logits, keys, values = self._run(inputs)
        self._last = (plan, keys, values)
        return [StepOutput(logits[plan.rows(i)], positions[plan.rows(i)], layout)
                for i, layout in enumerate(layouts)]

    def _static_shape(self, nodes: int) -> tuple[int, int] | None:
        """(T, S) of a static step of `nodes` real nodes: the smallest step size that holds them (after the
        engine's minimum), over every cell of the cache; None for dynamic steps."""
        sizes = self.info.step_sizes
        if sizes is None:
            return None
        fits = [size for size in sorted(sizes) if size >= max(nodes, self._min_rows)]
        if not fits:
            raise ValueError(f"a step of {nodes} nodes exceeds this engine's largest static step ({max(sizes)} "
                             "nodes): cut the prefill into chunks that fit (the generators do) or use a smaller tree")
        return fits[0], self._cache.capacity

    def commit_batch(self, accepted: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Append each sequence's accepted nodes (indices into its own draft) of the last step."""
        self._check_open()
        if self._last is None:
            raise RuntimeError("commit() needs a step() first")
        plan, keys, values = self._last
        first = {slot: row for slot, row, _ in plan.spans}
        for slot, nodes in accepted:
            if slot not in first:
                raise ValueError(f"sequence {slot} had no draft in the last step")
            self._cache.commit(slot, keys, values, [first[slot] + int(node) for node in nodes])

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
        self._cache = self._layouts = self._last = None  # type: ignore[assignment]

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
