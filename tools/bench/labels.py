"""Bench run labels: `method@variant`, parsed and validated, and which vanilla each run is compared with.

    vanilla            our method, variant fp32 (the default)          export.quantize.VARIANTS
    ppd@int8           our method on the int8 onnxruntime engine
    llamacpp@q8_0      the llama.cpp peer on that GGUF type             tools.peers.llamacpp_gguf.GGUF_TYPES
    llamacpp           llama.cpp at fp32's type (f32)
    hf-generate        other peers: their own model in the bench's --dtype, no variants

A label's *precision* is the variant of ours it stands next to (llama.cpp's q8_0 is our int8:
export.quantize.LLAMACPP_PEER_TYPE). Speedups are against the first vanilla listed; token agreement is
against the vanilla of the run's own precision when one ran (a method is lossless on its own engine),
else against that first vanilla.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from export.methods import METHODS
from export.quantize import DEFAULT_VARIANT, LLAMACPP_PEER_TYPE, VARIANTS
from tools.peers.llamacpp_gguf import GGUF_TYPES

LLAMACPP = "llamacpp"
PEERS = ("hf-generate", "hf-prompt-lookup", "hf-compiled", "ortgenai", LLAMACPP)
GREEDY_ONLY_PEERS = ("ortgenai", LLAMACPP)
_OUR_VARIANT_OF_LLAMACPP = {gguf: ours for ours, gguf in LLAMACPP_PEER_TYPE.items()}


@dataclass(frozen=True)
class RunLabel:
    label: str      # as listed ("ppd@int8", "vanilla"): the run's name in the report and the table
    method: str     # "ppd", "llamacpp", "hf-generate"
    variant: str    # "int8", "q8_0", "fp32": the default filled in

    @property
    def ours(self) -> bool:
        return self.method in METHODS

    @property
    def precision(self) -> str:
        """The variant of ours this run stands next to (fp32 / int8 / int4)."""
        return _OUR_VARIANT_OF_LLAMACPP[self.variant] if self.method == LLAMACPP else self.variant


def label_choices() -> str:
    return (f"{', '.join((*METHODS, *PEERS))}; our methods take @{'|'.join(VARIANTS)} (default {DEFAULT_VARIANT}), "
            f"{LLAMACPP} takes @{'|'.join(GGUF_TYPES)} (default {LLAMACPP_PEER_TYPE[DEFAULT_VARIANT]})")


def parse_label(label: str) -> RunLabel:
    """`method` or `method@variant` -> RunLabel; ValueError naming the label and the choices."""
    method, at, variant = label.partition("@")
    if method in METHODS:
        variants, default = VARIANTS, DEFAULT_VARIANT
    elif method == LLAMACPP:
        variants, default = GGUF_TYPES, LLAMACPP_PEER_TYPE[DEFAULT_VARIANT]
    elif method in PEERS:
        if at:
            raise ValueError(f"bench run {label!r}: the {method} peer has no variants (it runs its own model in the bench's --dtype); "
                             f"list it as {method!r}")
        return RunLabel(label, method, DEFAULT_VARIANT)
    else:
        raise ValueError(f"unknown method {method!r} in bench run {label!r}; choose from {label_choices()}")
    if not at:
        return RunLabel(label, method, default)
    if variant not in variants:
        raise ValueError(f"bench run {label!r}: {method} has no variant {variant!r}; choose one of {', '.join(variants)}")
    return RunLabel(label, method, variant)


def parse_labels(labels: Sequence[str]) -> tuple[RunLabel, ...]:
    """Every label parsed; the same method and variant listed twice (e.g. `vanilla,vanilla@fp32`) is refused."""
    if not labels:
        raise ValueError(f"no bench runs listed; choose from {label_choices()}")
    runs = tuple(parse_label(label) for label in labels)
    seen: dict[tuple[str, str], str] = {}
    for run in runs:
        key = (run.method, run.variant)
        if key in seen:
            raise ValueError(f"bench runs {seen[key]!r} and {run.label!r} are the same run ({run.method}@{run.variant}); "
                             "list it once")
        seen[key] = run.label
    return runs


def speed_baseline(runs: Sequence[RunLabel]) -> RunLabel | None:
    """The first vanilla listed: every speedup is against it."""
    return next((r for r in runs if r.method == "vanilla"), None)


def token_baseline(run: RunLabel, runs: Sequence[RunLabel]) -> RunLabel | None:
    """The vanilla whose tokens `run` is compared with: the one of its own precision, else the first."""
    same = next((r for r in runs if r.method == "vanilla" and r.variant == run.precision), None)
    return same or speed_baseline(runs)
