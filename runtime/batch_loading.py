"""Loading many methods on one backend for runtime.BatchGenerator: one backend with a cache of max_batch
sequences (runtime/loading.py loads it) and every requested method built on its graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from export.quantize import DEFAULT_VARIANT
from runtime.backends import DEFAULT_DTYPE, Backend
from runtime.backends.ort_backend import OrtOptions
from runtime.loading import StaticSteps, device_step_sizes, load_engine, load_pretrained, open_backend

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.methods import Method


def graph_of(methods: Sequence[str]) -> str:
    """The one graph that serves every method of `methods` (vanilla and ngram ride any; a trained method
    needs its own), or ValueError naming the clash."""
    from export.methods import method_spec

    graphs = {method_spec(name).graph for name in methods if method_spec(name).trained}
    if len(graphs) > 1:
        raise ValueError(f"methods {list(methods)} need the graphs {sorted(graphs)}; one backend runs one graph: "
                         "serve them from separate BatchGenerators")
    return graphs.pop() if graphs else "vanilla"


def load_batch_pretrained(model_dir: str | Path, methods: Sequence[str], backend: str = "torch", device: str = "cpu",
                          max_context: int | None = None, max_batch: int = 1, dtype: str = DEFAULT_DTYPE,
                          variant: str = DEFAULT_VARIANT, threads: int | None = None,
                          static_steps: StaticSteps = None, **method_options) -> tuple[Backend, "PreTrainedTokenizerBase",
                                                                                     dict[str, "Method"]]:
    """One backend for `model_dir` with a cache of `max_batch` sequences, and every method of `methods`
    built on its graph (`method_options` go to the methods that take them)."""
    from transformers import AutoConfig

    from export.checkpoint import check_model_dir
    from runtime.methods import build_method

    if not methods:
        raise ValueError("name at least one method")
    graph = graph_of(methods)
    unknown = set(method_options) - set().union(*(_option_names(name) for name in methods))
    if unknown:
        raise ValueError(f"option(s) {sorted(unknown)} belong to none of the methods {list(methods)}")
    config = AutoConfig.from_pretrained(check_model_dir(model_dir))
    built = {}
    for name in dict.fromkeys(methods):
        known = {key for key in method_options if key in _option_names(name)}
        built[name] = build_method(name, model_dir, config.vocab_size, config.hidden_size, device=device,
                                   backend=backend, variant=variant, **{key: method_options[key] for key in known})
    carrier = next((m for m in built.values() if m.spec.graph == graph), None) or build_method(
        graph, model_dir, config.vocab_size, config.hidden_size, device=device, backend=backend, variant=variant)
    runner, tokenizer = load_pretrained(backend, model_dir, carrier, device, max_context, dtype, variant, max_batch,
                                        threads, static_steps)
    return runner, tokenizer, built


def load_batch_engine(engine_dir: str | Path, methods: Sequence[str] | None = None, device: str = "cpu",
                      max_context: int | None = None, max_batch: int = 1, threads: int | None = None,
                      static_steps: StaticSteps = None) -> tuple[Backend, "PreTrainedTokenizerBase",
                                                                                  dict[str, "Method"]]:
    """An engine dir's backend with a cache of `max_batch` sequences, and the methods it serves
    (default: its own, then vanilla and ngram)."""
    from export.quantize import engine_variant
    from runtime.methods import engine_method

    engine = load_engine(engine_dir, device, max_context)
    names = methods or list(dict.fromkeys([engine.manifest.method.name, "vanilla", "ngram"]))
    variant = engine_variant(engine.manifest)
    built = {name: engine_method(engine.manifest, name, device=device, variant=variant) for name in names}
    tree = max(method.proposer.max_draft_tokens for method in built.values())
    runner = open_backend(engine.graph, device, max_batch=max_batch, options=OrtOptions(threads=threads),
                          step_sizes=device_step_sizes(device, tree, max_batch, static_steps))
    return runner, engine.tokenizer, built


def _option_names(method: str) -> set[str]:
    import dataclasses

    from export.methods import method_spec

    return {f.name for f in dataclasses.fields(method_spec(method).options)}
