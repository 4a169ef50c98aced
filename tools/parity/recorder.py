"""Real step inputs for parity checks (`python -m tools check`, tools/parity/compare.py): the feeds the decode
loop gives a backend, recorded from the torch reference decoding real prompts with an engine's methods.

    prefill              the prompt as one chain on an empty cache (S = 0)
    one-token prefill    T = 1 on S = 0 (the edge a TensorRT binding must survive: no cache at all)
    probe trees          wide trees of fixed sizes (4, 16, the engine's max tree) over the prompt's cache,
                         real tokens from the prompt: tree masks of several sizes whatever the methods proposed
    decode steps         of every method the engine's graph serves (vanilla, ngram, and ppd + hybrid or
                         ht): each method's first steps of distinct tree sizes, tree masks included

A feed holds the manifest's inputs in its dtypes: input_ids, position_ids (depth + S), tree_mask
(additive, the dtype's lowest finite value), past_key.i / past_value.i (the committed cache the
step saw, [S, Hkv, D] per layer).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.manifest import Manifest
from export.methods import METHODS
from export.step_model import StepModel
from runtime.backends.base import StepTensors
from runtime.backends.torch_backend import TorchBackend
from runtime.draft import Draft
from tools.bench.prompts import load_prompts


@dataclass(frozen=True)
class RecordConfig:
    prompts: str = "mtbench"        # prompt set (tools/bench/prompts.py) ...
    prompt_index: int = 0           # ... and which of its prompts is decoded
    max_new_tokens: int = 32        # per method at most: it stops once its steps are kept
    steps_per_method: int = 2       # decode steps kept per method (distinct tree sizes first)
    probe_sizes: tuple[int, ...] = (4, 16, 64)   # capped at the engine's max tree


@dataclass(frozen=True)
class RecordedStep:
    label: str                      # "ppd decode T=10 S=57"
    feed: OrderedDict               # input name -> array, in the manifest's order and dtypes


class RecordingTorchBackend(TorchBackend):
    """The torch backend, copying the inputs of the steps `keep(draft, S)` names (a label, or None)."""

    def __init__(self, model: StepModel, manifest: Manifest, max_context: int) -> None:
        super().__init__(model, max_context=max_context)
        self.manifest = manifest
        self.keep: Callable[[Draft, int], str | None] = lambda draft, s: None
        self.recorded: list[RecordedStep] = []
        self._label: str | None = None

    def step(self, draft: Draft):
        self._label = self.keep(draft, self.length)
        return super().step(draft)

    def _run(self, inputs: StepTensors):
        if self._label is not None:
            self.recorded.append(RecordedStep(self._label, self._feed(inputs)))
            self._label = None
        return super()._run(inputs)

    def _feed(self, inputs: StepTensors) -> OrderedDict:
        """The step's inputs as the engine's graph takes them (its names, order and dtypes)."""
        specs = {spec.name: np.dtype(spec.dtype) for spec in self.manifest.inputs}
        float_dtype = np.dtype(self.manifest.dtype)
        # Masks in the graph's own dtype: its lowest finite value (a cast of fp32's would be -inf in fp16).
        hidden = np.finfo(float_dtype).min

        def mask(tensor):
            return np.where(tensor.cpu().numpy() == 0, 0.0, hidden)

        # None: every bound cell visible
        past = np.zeros((inputs.size, inputs.past_length)) if inputs.past_mask is None else mask(inputs.past_mask)
        keys, values = self._cache.past()
        arrays = {"input_ids": inputs.ids.cpu().numpy(), "position_ids": inputs.positions.cpu().numpy(),
                  "tree_mask": mask(inputs.tree_mask), "past_mask": past,
                  **{name: mask(m) for name, m in zip(self.manifest.model.sliding_mask_inputs, inputs.sliding or ())},
                  **{f"past_key.{i}": k.detach().cpu().float().numpy() for i, k in enumerate(keys)},
                  **{f"past_value.{i}": v.detach().cpu().float().numpy() for i, v in enumerate(values)}}
        return OrderedDict((name, np.ascontiguousarray(arrays[name], dtype=dtype)) for name, dtype in specs.items())


def recorded_methods(manifest: Manifest) -> list[str]:
    """The methods an engine's graph serves, untrained first: vanilla, ngram, then the graph's own
    tree methods (ppd and hybrid on a ppd graph, ht on an ht graph)."""
    return [name for name, spec in METHODS.items()
            if not spec.trained or spec.graph == manifest.method.name]


def record_step_feeds(manifest: Manifest, step_model: StepModel, tokenizer, config: RecordConfig = RecordConfig(),
                      log=print) -> list[RecordedStep]:
    """Decode one real prompt with every method the engine serves (greedy, torch reference, the engine's
    trees) and keep the prefill, a one-token prefill and each method's first decode steps of distinct sizes."""
    from runtime.methods import engine_method
    from runtime.generator import Generator, Result, eos_token_ids

    items = load_prompts(config.prompts, config.prompt_index + 1)
    if len(items) <= config.prompt_index:
        raise ValueError(f"{config.prompts} has no prompt {config.prompt_index}")
    backend = RecordingTorchBackend(step_model, manifest, manifest.max_context)
    kept: dict[str, set[int]] = {}

    def quota(method: str) -> int:   # vanilla's steps are all T = 1: one says it all
        return 1 if method == "vanilla" else config.steps_per_method

    def keep_for(method: str, with_prefill: bool) -> Callable[[Draft, int], str | None]:
        def keep(draft: Draft, s: int) -> str | None:
            if s == 0:
                return f"prefill T={draft.size} S=0" if with_prefill else None
            sizes = kept.setdefault(method, set())
            if draft.size in sizes or len(sizes) >= quota(method):
                return None
            if draft.size == 1 and method != "vanilla":   # another method's root-only step says nothing new
                return None
            sizes.add(draft.size)
            return f"{method} decode T={draft.size} S={s}"
        return keep

    prompt = items[config.prompt_index].prompt
    eos = eos_token_ids(tokenizer)
    for i, name in enumerate(recorded_methods(manifest)):
        method = engine_method(manifest, name)
        generator = Generator(backend, tokenizer, method.proposer, eos)
        backend.keep = keep_for(name, with_prefill=i == 0)
        result = Result([], "")
        for _ in generator.stream(prompt, max_new_tokens=config.max_new_tokens, result=result):
            if len(kept.get(name, ())) >= quota(name):
                break
        log(f"recorded {name}: kept {len(kept.get(name, ()))} decode step(s) of the {result.stats.steps} run")
        if i == 0:
            record_probe_trees(backend, generator.encode(prompt), config.probe_sizes)
            # T = 1 on an empty cache: a one-token prompt's prefill
            backend.keep = lambda draft, s: "prefill T=1 S=0" if s == 0 else None
            generator.generate(generator.encode(prompt)[:1], max_new_tokens=1)
    backend.keep = lambda draft, s: None
    return backend.recorded


def record_probe_trees(backend: RecordingTorchBackend, prompt_ids: list[int], sizes: tuple[int, ...]) -> None:
    """One step per size over the committed cache (its new entries not committed): a wide tree
    (tools.latency.profile.fan_tree) whose nodes hold the prompt's tokens backwards from its last one (the root)."""
    from runtime.draft import Layout
    from tools.latency.profile import fan_tree

    limit = min(backend.manifest.max_tree, backend.info.max_context - backend.length)
    for size in sorted({min(size, limit) for size in sizes}):
        tokens = np.resize(np.asarray(prompt_ids[::-1], dtype=np.int64), size)
        draft = Draft(tokens, Layout.from_parents(fan_tree(size).buffers.parents))
        backend.keep = lambda d, s, size=size: f"probe tree T={size} S={s}"
        backend.step(draft)
