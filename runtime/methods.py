"""The registry of decoding methods: name -> proposer (and, for trained methods, model extras)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from export.checkpoint import model_fingerprint
from export.ht import DEFAULT_HT_CHECKPOINT, TransferMaps, load_transfer_maps
from export.paths import REPO_ROOT
from export.ppd import DEFAULT_PPD_CHECKPOINT, PPDConfig, load_prompt_tokens
from runtime.devices import default_tree
from runtime.proposers import NgramConfig, NgramProposer, Proposer, VanillaProposer
from runtime.proposers.ppd import PPDProposer
from trees import check_tree_identity, load_ppd_trees, prompt_tokens_sha256

METHODS = ("vanilla", "ngram", "ppd", "ht")
# Hand-picked CPU tree for the committed SmolLM2 prompt tokens: the fallback when no tree was searched
# for the device (`python -m trees build`, runtime/devices.py finds it next to the checkpoint).
DEFAULT_PPD_TREE = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct" / "ppd-tree-cpu.json"
# Hand-picked CPU tree for the committed SmolLM2 HT maps, in the PPD tree-set format (N = k).
DEFAULT_HT_TREE = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct" / "ht-tree-cpu.json"
# The hand-picked tree of each tree method: the fallback above, the reference in sweeps, and the deep,
# branching tree the lossless tests walk.
HAND_PICKED_TREES = {"ppd": DEFAULT_PPD_TREE, "ht": DEFAULT_HT_TREE}


@dataclass
class Method:
    name: str
    proposer: Proposer
    extra_embeddings: torch.Tensor | None = None  # [E, H] rows appended after the vocabulary
    transfer_maps: TransferMaps | None = None     # HT: pseudo slots vocab + j filled after layer l
    checkpoint: Path | None = None                # file the trained extras came from (engine manifests record it)


@dataclass(frozen=True)
class PPDOptions:
    checkpoint: str = str(DEFAULT_PPD_CHECKPOINT)
    tree: str | None = None               # None: the tree searched for this device and backend, else DEFAULT_PPD_TREE
    num_prompt_tokens: int | None = None  # when given, the checkpoint must have exactly this N ...
    ensemble: int | None = None           # ... and this k


@dataclass(frozen=True)
class HTOptions:
    checkpoint: str = str(DEFAULT_HT_CHECKPOINT)
    tree: str | None = None      # None: the tree searched for this device and backend, else DEFAULT_HT_TREE
    num_maps: int | None = None  # when given, the checkpoint must have exactly this k ...
    layer: int | None = None     # ... and read this layer


@dataclass(frozen=True)
class _NoOptions:
    pass


def _config(cls: type, name: str, options: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {sorted(known)}")
    return cls(**options)


def build_method(name: str, model_dir: str | Path, vocab_size: int, hidden_size: int, *, device: str = "cpu",
                 backend: str = "torch", **options) -> Method:
    """Build method `name` for the checkpoint in `model_dir` (trained extras are checked against it).
    `device` and `backend` only pick ppd's and ht's default tree: the one searched for that device."""
    if name == "vanilla":
        _config(_NoOptions, name, options)
        return Method(name, VanillaProposer())
    if name == "ngram":
        return Method(name, NgramProposer(_config(NgramConfig, name, options)))
    if name == "ppd":
        opts: PPDOptions = _config(PPDOptions, name, options)
        expected = None
        if opts.num_prompt_tokens is not None or opts.ensemble is not None:
            default = PPDConfig()
            expected = PPDConfig(opts.num_prompt_tokens or default.num_prompt_tokens, opts.ensemble or default.ensemble)
        fingerprint = model_fingerprint(model_dir)
        embeddings, config = load_prompt_tokens(opts.checkpoint, fingerprint, hidden_size, expected)
        tree_path = opts.tree or default_tree(name, device, backend, opts.checkpoint, DEFAULT_PPD_TREE)
        trees = load_ppd_trees(tree_path)
        check_tree_identity(trees, fingerprint, prompt_tokens_sha256(embeddings))
        proposer = PPDProposer(config, trees, vocab_size)
        return Method(name, proposer, embeddings, checkpoint=Path(opts.checkpoint))
    if name == "ht":
        # HT at inference is PPD's dynamic sparse tree with ensemble 1: each candidate node carries
        # its own chain of pseudo slots (ids vocab + j), which the step model fills from the node's
        # layer-l state; so the proposer and the tree set are PPD's, only the step model differs.
        opts: HTOptions = _config(HTOptions, name, options)
        fingerprint = model_fingerprint(model_dir)
        maps = load_transfer_maps(opts.checkpoint, fingerprint, hidden_size, opts.num_maps, opts.layer)
        trees = load_ppd_trees(opts.tree or default_tree(name, device, backend, opts.checkpoint, DEFAULT_HT_TREE))
        check_tree_identity(trees, fingerprint, maps.sha256)
        proposer = PPDProposer(maps.layout, trees, vocab_size)
        return Method(name, proposer, transfer_maps=maps, checkpoint=Path(opts.checkpoint))
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
