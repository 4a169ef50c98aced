"""The one record of each decoding method, and what a trained method bakes into its step graph.

A `MethodSpec` says everything the packages need to know about a method: its name, its options
dataclass (what `Generator.from_pretrained(method=..., **options)` takes), whether it bakes trained
tensors into the graph (and where its committed checkpoint is), whether it decodes with a tree set
(and which hand-picked tree is its fallback) and which exported graph serves it. How each method's
proposer is built is the runtime's (runtime/methods.py BUILDERS, keyed by these names: runtime/
stands above export/, so export/ never imports it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.ht import DEFAULT_HT_CHECKPOINT, TransferMaps, load_transfer_maps
from export.paths import REPO_ROOT
from export.ppd import DEFAULT_PPD_CHECKPOINT, PPDConfig, load_prompt_tokens

CHECKPOINTS_DIR = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct"


# --- options of each method (the one home of their defaults) --------------------------------------

@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class NgramOptions:
    max_ngram: int = 3      # longest suffix n-gram to look up; shorter ones fill the rest of the budget
    min_ngram: int = 1
    max_depth: int = 7      # tokens per continuation
    max_nodes: int = 10     # tree budget, root included (T of the step)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"ngram sizes need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.max_depth < 1 or self.max_nodes < 2:
            raise ValueError("ngram needs max_depth >= 1 and max_nodes >= 2")


@dataclass(frozen=True)
class PPDOptions:
    checkpoint: str = str(DEFAULT_PPD_CHECKPOINT)
    tree: str | None = None               # None: the tree searched for this device and backend, else the hand-picked one
    num_prompt_tokens: int | None = None  # when given, the checkpoint must have exactly this N ...
    ensemble: int | None = None           # ... and this k


@dataclass(frozen=True)
class HybridOptions(PPDOptions):
    """PPD's options (its checkpoint, tree and N/k checks) plus the n-gram source merged into each step."""

    # None: what the hybrid tree file's search chose for the device (else DEFAULT_HYBRID_NGRAM)
    ngram_depth: int | None = None          # n-gram continuation tokens merged into the PPD tree per step
    ngram_prompt_tokens: int | None = None  # prompt tokens carried by each node only the n-gram proposed
    max_ngram: int = 3              # longest suffix n-gram looked up (then shorter ones) ...
    min_ngram: int | None = None    # ... down to this length (None: the tree file's, else 1)

    def __post_init__(self) -> None:
        if (self.ngram_depth is not None and self.ngram_depth < 0) or (
                self.ngram_prompt_tokens is not None and self.ngram_prompt_tokens < 0):
            raise ValueError(f"hybrid needs ngram_depth >= 0 and ngram_prompt_tokens >= 0, got {self.ngram_depth}, "
                             f"{self.ngram_prompt_tokens}")
        if self.min_ngram is not None and not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"ngram sizes need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


# (ngram_depth, ngram_prompt_tokens) of a hybrid whose tree file was not searched for it.
DEFAULT_HYBRID_NGRAM = (4, 1)


@dataclass(frozen=True)
class HTOptions:
    checkpoint: str = str(DEFAULT_HT_CHECKPOINT)
    tree: str | None = None      # None: the tree searched for this device and backend, else the hand-picked one
    num_maps: int | None = None  # when given, the checkpoint must have exactly this k ...
    layer: int | None = None     # ... and read this layer


# --- what a trained method adds to the step graph --------------------------------------------------

def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class MethodExtras:
    """What a method adds to the step graph (ppd: rows after the vocabulary; ht: transfer maps
    applied after layer l), and the options an engine records for it (ppd: N, k; ht: k, layer)."""

    embeddings: torch.Tensor | None = None    # [E, H]
    options: dict = field(default_factory=dict)
    transfer_maps: TransferMaps | None = None
    checkpoint: Path | None = None            # the file the tensors came from

    def __post_init__(self) -> None:
        if self.embeddings is not None and self.transfer_maps is not None:
            raise ValueError("a graph takes PPD prompt-token rows or HT transfer maps, not both")

    @property
    def weights_sha256(self) -> str | None:
        """Identity of the trained tensors baked into the graph (the engine's staleness key)."""
        if self.transfer_maps is not None:
            return self.transfer_maps.sha256
        return None if self.embeddings is None else tensor_sha256(self.embeddings)

    @property
    def slot_layout(self) -> PPDConfig | None:
        """How the method's extra slots are laid out in a tree (N prompt tokens x k), or None."""
        if self.transfer_maps is not None:
            return self.transfer_maps.layout
        if self.embeddings is not None:
            return PPDConfig(self.options["num_prompt_tokens"], self.options["ensemble"])
        return None


def load_ppd_extras(checkpoint: str | Path, fingerprint: str, hidden_size: int,
                    expected: PPDConfig | None = None) -> MethodExtras:
    embeddings, config = load_prompt_tokens(checkpoint, fingerprint, hidden_size, expected)
    return MethodExtras(embeddings, {"num_prompt_tokens": config.num_prompt_tokens, "ensemble": config.ensemble},
                        checkpoint=Path(checkpoint))


def load_ht_extras(checkpoint: str | Path, fingerprint: str, hidden_size: int, num_maps: int | None = None,
                   layer: int | None = None) -> MethodExtras:
    maps = load_transfer_maps(checkpoint, fingerprint, hidden_size, num_maps, layer)
    return MethodExtras(options={"num_maps": maps.num_maps, "layer": maps.layer}, transfer_maps=maps,
                        checkpoint=Path(checkpoint))


# --- the records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: type                       # options dataclass: Generator.from_pretrained(method=name, **options)
    graph: str                          # the exported graph that serves it (vanilla = no trained tensors)
    # trained methods: (checkpoint, model fingerprint, hidden size) -> the tensors their graph bakes in
    load_tensors: Callable[[str | Path, str, int], MethodExtras] | None = None
    default_checkpoint: Path | None = None   # trained methods: the committed checkpoint
    hand_picked_tree: Path | None = None     # tree methods: the fallback when no tree was searched for the device
    train_command: str | None = None    # how the checkpoint is made
    tree_search: bool = True            # tree methods: `python -m tools trees` searches its trees
    ngram_candidates: bool = False      # its steps also hold n-gram candidates (searched with their statistics)

    @property
    def trained(self) -> bool:
        """Bakes trained tensors (from a checkpoint) into its graph."""
        return self.load_tensors is not None

    @property
    def tree_set(self) -> bool:
        """Decodes with a PPD-format tree set (searched per device by `python -m tools trees`)."""
        return self.hand_picked_tree is not None

    def make_options(self, options: dict):
        """The options dataclass from keyword options, refusing unknown names."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; valid: {sorted(known)}")
        return self.options(**options)

    def load_extras(self, checkpoint: str | Path, fingerprint: str, hidden_size: int) -> MethodExtras:
        """The trained tensors of `checkpoint` for this method's graph (refused when trained for another model)."""
        if self.load_tensors is None:
            raise ValueError(f"method {self.name!r} has no trained tensors")
        return self.load_tensors(checkpoint, fingerprint, hidden_size)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("vanilla", NoOptions, graph="vanilla"),
    MethodSpec("ngram", NgramOptions, graph="vanilla"),
    MethodSpec("ppd", PPDOptions, graph="ppd", load_tensors=load_ppd_extras,
               default_checkpoint=DEFAULT_PPD_CHECKPOINT, hand_picked_tree=CHECKPOINTS_DIR / "ppd-tree-cpu.json",
               train_command="python -m train ppd"),
    # PPD's tree and the n-gram continuation in one step, on the ppd graph (runtime/proposers/hybrid.py).
    MethodSpec("hybrid", HybridOptions, graph="ppd", load_tensors=load_ppd_extras,
               default_checkpoint=DEFAULT_PPD_CHECKPOINT, hand_picked_tree=CHECKPOINTS_DIR / "ppd-tree-cpu.json",
               train_command="python -m train ppd", ngram_candidates=True),
    # HT at inference is PPD's dynamic sparse tree with ensemble 1 over pseudo slots (export/ht.py).
    MethodSpec("ht", HTOptions, graph="ht", load_tensors=load_ht_extras,
               default_checkpoint=DEFAULT_HT_CHECKPOINT, hand_picked_tree=CHECKPOINTS_DIR / "ht-tree-cpu.json",
               train_command="python -m train ht"),
)}
TREE_METHODS = tuple(name for name, spec in METHODS.items() if spec.tree_set)
# Methods whose trees `python -m tools trees build` searches, and the graphs whose slots' acceptance
# statistics they are searched on (hybrid: ppd's, plus the n-gram statistics).
TREE_SEARCH_METHODS = tuple(name for name in TREE_METHODS if METHODS[name].tree_search)
STATS_METHODS = tuple(dict.fromkeys(METHODS[name].graph for name in TREE_SEARCH_METHODS))
TRAINED_METHODS = tuple(name for name, spec in METHODS.items() if spec.trained)
EXPORT_METHODS = tuple(dict.fromkeys(spec.graph for spec in METHODS.values()))


def method_spec(name: str, among: tuple[str, ...] | None = None) -> MethodSpec:
    """The record of `name`, refusing unknown names (or names outside `among`) with the choices."""
    choices = tuple(METHODS) if among is None else among
    if name not in choices:
        raise ValueError(f"unknown method {name!r} here; choose one of {', '.join(choices)}")
    return METHODS[name]
