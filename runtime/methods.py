"""The registry of decoding methods: name -> proposer (and, for trained methods, model extras)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from runtime.proposers import NgramConfig, NgramProposer, Proposer, VanillaProposer

METHODS = ("vanilla", "ngram")


@dataclass
class Method:
    name: str
    proposer: Proposer
    extra_embeddings: torch.Tensor | None = None  # [E, H] rows appended after the vocabulary


def _config(cls: type, name: str, options: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {sorted(known)}")
    return cls(**options)


def build_method(name: str, **options) -> Method:
    if name == "vanilla":
        _config(_NoOptions, name, options)
        return Method(name, VanillaProposer())
    if name == "ngram":
        return Method(name, NgramProposer(_config(NgramConfig, name, options)))
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class _NoOptions:
    pass
