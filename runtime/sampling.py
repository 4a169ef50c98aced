"""Exact sampling for deterministic drafts: one logits processor, one keyed random stream.

For a draft whose candidates are fixed tokens (no draft distribution), drawing x from the target's
processed distribution at each accepted node, descending to the child whose token is x, and
otherwise ending the step with x as the bonus token, emits exactly what plain sampling emits
(SpecInfer's multi-branch rejection sampling with one-hot drafts). If the uniform of every draw
is a function of (seed, absolute position of the token drawn) only, then for a given seed every
method emits token for token what plain sampling emits: losslessness is an equality test.

    process_logits(logits [N, V], options) -> probs [N, V]     temperature, top-k, top-p
    keyed_uniforms(seed, positions [N]) -> u [N] in [0, 1)     counter-based (SplitMix64), any device
    draw(probs, u) -> [N]                                      inverse CDF in float64
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runtime.verify import DecodingOptions

# SplitMix64 constants as signed int64 (torch has no uint64 arithmetic; products wrap mod 2^64).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def keyed_uniforms(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] float64 uniforms in [0, 1), one per absolute position, from SplitMix64 of (seed, position):
    the same on every device and for every method, whatever else was drawn before."""
    z = positions.to(torch.int64) * _GOLDEN + (seed & ((1 << 63) - 1))
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def process_logits(logits: torch.Tensor, options: "DecodingOptions") -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities: divide by the temperature, keep the top_k most
    likely tokens (ties at the k-th value kept), then the smallest set of most likely tokens whose
    mass reaches top_p (the token that crosses it included), renormalised."""
    scores = logits.float() / options.temperature
    if options.top_k and options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs   # mass of the more likely tokens
        drop_sorted = mass_before >= options.top_p                          # the crossing token stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[N] token ids: the first token whose cumulative probability exceeds u (float64, so a token of
    probability 0 is never drawn)."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class SamplingVerifier:
    """Chooses, after each candidate node, the token plain sampling would draw at the next position."""

    def __init__(self, options: "DecodingOptions", seed: int) -> None:
        self.options, self.seed = options, seed

    def choose(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The token after a node at position p sits at p + 1: its draw is keyed by p + 1.
        return draw(process_logits(logits, self.options), keyed_uniforms(self.seed, positions + 1))
