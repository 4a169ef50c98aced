"""Building a method: its record (export/methods.py) -> proposer + trained tensors, for one checkpoint
(`build_method`) or for an exported engine dir (`engine_method`). BUILDERS, keyed by the records'
names, holds the only code that knows how each method's proposer is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import model_fingerprint
from export.engine import engine_tree_path
from export.manifest import Manifest
from export.methods import (DEFAULT_HYBRID_NGRAM, METHODS, HTOptions, HybridOptions, MethodExtras, MethodSpec, NgramOptions, NoOptions,
                            PPDOptions, load_ht_extras, load_ppd_extras, method_spec)
from export.ppd import PPDConfig
from export.quantize import DEFAULT_VARIANT, check_variant
from runtime.backends import DEFAULT_BACKEND
from export.devices import default_tree, warn_if_searched_for_another_cpu
from runtime.proposers import NgramProposer, Proposer, VanillaProposer
from runtime.proposers.hybrid import HybridProposer, NgramSource
from runtime.proposers.ppd import PPDProposer
from trees import TreeError, check_tree_identity, load_ppd_trees
from trees.ppd_tree import BATCH_FIELD


@dataclass
class Method:
    spec: MethodSpec
    proposer: Proposer
    extras: MethodExtras = MethodExtras()    # trained tensors baked into the step (ppd rows, ht maps)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class BuildContext:
    """What a builder may read: the checkpoint it is for, and where it will run (device, backend and
    engine variant pick the tree)."""

    model_dir: Path
    vocab_size: int
    hidden_size: int
    device: str = "cpu"
    backend: str = DEFAULT_BACKEND
    variant: str = DEFAULT_VARIANT     # the engine's weights (export/quantize.py): fp32, int8, int4


def build_method(name: str, model_dir: str | Path, vocab_size: int, hidden_size: int, *, device: str = "cpu",
                 backend: str = DEFAULT_BACKEND, variant: str = DEFAULT_VARIANT, **options) -> Method:
    """Build method `name` for the checkpoint in `model_dir` (trained tensors are checked against it).
    `device`, `backend` and `variant` (the engine's weight quantization) only pick a tree method's
    default tree, the one searched for them, and which searched trees it accepts (fp32's, or the
    variant's own)."""
    spec = method_spec(name)
    return BUILDERS[spec.name](spec, spec.make_options(options),
                               BuildContext(Path(model_dir), vocab_size, hidden_size, device, backend,
                                            check_variant(variant)))


def build_vanilla(spec: MethodSpec, options: NoOptions, context: BuildContext) -> Method:
    return Method(spec, VanillaProposer())


def build_ngram(spec: MethodSpec, options: NgramOptions, context: BuildContext) -> Method:
    return Method(spec, NgramProposer(options))


def _tree_set(spec: MethodSpec, tree: str | None, checkpoint: str, context: BuildContext, fingerprint: str,
              weights_sha256: str):
    """`tree`, else the tree searched for this method on the device (the engine variant's, else
    fp32's), else (a method riding another's graph, like hybrid on ppd's) the graph's tree for the
    device, else the hand-picked one."""
    where = (context.device, context.backend, checkpoint)
    fallback = spec.hand_picked_tree
    if spec.graph != spec.name:
        fallback = default_tree(spec.graph, *where, fallback, context.variant)
    path = tree or default_tree(spec.name, *where, fallback, context.variant)
    trees = load_ppd_trees(path)
    try:
        check_tree_identity(trees, fingerprint, weights_sha256, context.variant)
    except TreeError as exc:
        raise TreeError(f"{path}: {exc}") from exc   # which file: a default tree is not named by the caller
    warn_if_searched_for_another_cpu(path, trees.metadata, context.device)
    return trees


def _ppd_extras(options: PPDOptions, context: BuildContext) -> tuple[MethodExtras, str]:
    """The prompt tokens of a ppd-graph method (and the model fingerprint they were checked against)."""
    expected = None
    if options.num_prompt_tokens is not None or options.ensemble is not None:
        default = PPDConfig()
        expected = PPDConfig(options.num_prompt_tokens or default.num_prompt_tokens,
                             options.ensemble or default.ensemble)
    fingerprint = model_fingerprint(context.model_dir)
    return load_ppd_extras(options.checkpoint, fingerprint, context.hidden_size, expected), fingerprint


def build_ppd(spec: MethodSpec, options: PPDOptions, context: BuildContext) -> Method:
    extras, fingerprint = _ppd_extras(options, context)
    trees = _tree_set(spec, options.tree, options.checkpoint, context, fingerprint, extras.weights_sha256)
    return Method(spec, PPDProposer(extras.slot_layout, trees, context.vocab_size), extras)


def build_hybrid(spec: MethodSpec, options: HybridOptions, context: BuildContext) -> Method:
    extras, fingerprint = _ppd_extras(options, context)
    trees = _tree_set(spec, options.tree, options.checkpoint, context, fingerprint, extras.weights_sha256)
    # The n-gram budget the search chose with this tree (its "hybrid" record), unless options say otherwise.
    searched = (trees.metadata or {}).get("hybrid", {})
    depth, count = DEFAULT_HYBRID_NGRAM
    source = NgramSource(searched.get("ngram_depth", depth) if options.ngram_depth is None else options.ngram_depth,
                         searched.get("ngram_prompt_tokens", count) if options.ngram_prompt_tokens is None
                         else options.ngram_prompt_tokens, options.max_ngram,
                         searched.get("min_ngram", 1) if options.min_ngram is None else options.min_ngram)
    # Per batch size, the n-gram half searched with that B's trees, unless the options fix it for all
    batch_sources = {}
    if (options.ngram_depth, options.ngram_prompt_tokens, options.min_ngram) == (None, None, None):
        for b, entry in (trees.metadata.get(BATCH_FIELD) or {}).items():
            if entry.get("hybrid"):
                part = entry["hybrid"]
                batch_sources[int(b)] = NgramSource(part["ngram_depth"], part["ngram_prompt_tokens"],
                                                    options.max_ngram, part["min_ngram"])
    return Method(spec, HybridProposer(extras.slot_layout, trees, context.vocab_size, source, batch_sources), extras)


def build_ht(spec: MethodSpec, options: HTOptions, context: BuildContext) -> Method:
    # HT at inference is PPD's dynamic sparse tree with ensemble 1: each candidate node carries
    # its own chain of pseudo slots (ids vocab + j), which the step model fills from the node's
    # layer-l state; so the proposer and the tree set are PPD's, only the step model differs.
    fingerprint = model_fingerprint(context.model_dir)
    extras = load_ht_extras(options.checkpoint, fingerprint, context.hidden_size, options.num_maps, options.layer)
    trees = _tree_set(spec, options.tree, options.checkpoint, context, fingerprint, extras.weights_sha256)
    return Method(spec, PPDProposer(extras.slot_layout, trees, context.vocab_size), extras)


# How each method of export/methods.py METHODS is built (a test checks every record has its builder).
BUILDERS: dict[str, Callable[..., Method]] = {
    "vanilla": build_vanilla,
    "ngram": build_ngram,
    "ppd": build_ppd,
    "hybrid": build_hybrid,
    "ht": build_ht,
}


def engine_method(manifest: Manifest, name: str | None = None, device: str = "cpu", **options) -> Method:
    """Build the method an engine dir runs: by default the one it was exported for, with its options
    (ppd: N, k; ht: k, layer; and the checkpoint); `name` may pick another method its graph serves
    (vanilla or ngram on any engine, hybrid on a ppd engine). The method's tensors must be the ones
    in the graph. A tree method takes the tree installed in the dir (its own, else its graph's),
    unless `tree` says otherwise; `variant` picks the variant's searched tree."""
    record = manifest.method
    name = record.name if name is None else name
    spec = method_spec(name)
    own_graph = spec.graph == record.name
    if spec.trained and not own_graph:
        raise ValueError(f"method {name!r} needs its trained tensors in the graph, but {manifest.dir} is an "
                         f"{record.name!r} engine: export one with `python -m export onnx --method {spec.graph} ...`, "
                         f"or pick vanilla or ngram, which run on any engine")
    if own_graph and spec.trained:
        options = {**record.options, **({"checkpoint": record.checkpoint.file} if record.checkpoint else {}), **options}
    # The tree `make engine` installed for this device: the method's own, else its graph's.
    engine_tree = next((path for path in (engine_tree_path(manifest, name), engine_tree_path(manifest))
                        if path.is_file()), None)
    if own_graph and spec.tree_set and "tree" not in options and engine_tree is not None:
        options["tree"] = str(engine_tree)
    model = manifest.model
    # build_method reads model_dir only to check a trained checkpoint's model fingerprint (ppd, ht).
    method = build_method(name, model.source_dir, model.vocab_size, model.hidden_size, device=device,
                          backend="onnxruntime", **options)
    weights = method.extras.weights_sha256
    if weights is not None and (not own_graph or weights != record.weights_sha256):
        raise ValueError(f"method {name!r} brings trained tensors that are not the ones exported into "
                         f"{manifest.dir} (a {record.name!r} engine); export an engine with this checkpoint "
                         f"(`python -m export onnx --method {name} --checkpoint FILE ...`)")
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return method


__all__ = ["BUILDERS", "METHODS", "BuildContext", "Method", "build_method", "engine_method"]
