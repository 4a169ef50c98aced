"""Exact sampling for deterministic drafts: one logits processor, one keyed random stream.

For a draft whose candidates are fixed tokens (no draft distribution), drawing x from the target's
processed distribution at each accepted node, descending to the child whose token is x, and
otherwise ending the step with x as the bonus token, emits exactly what plain sampling emits
(SpecInfer's multi-branch rejection sampling with one-hot drafts). If every random number of a draw
is a function of (seed, absolute position of the token drawn, token id) only, then for a given seed
every method emits token for token what plain sampling emits: losslessness is an equality test.

The draw is a Gumbel-max race, not an inverse CDF: the token drawn is the kept token with the
largest log p + Gumbel(seed, position, token). A tree step and a one-token step compute logits with
different kernels, so they differ by rounding (~1e-6). An inverse CDF moves every boundary with the
rounding of all tokens before it in the vocabulary and so, over 49k tokens, picked a neighbouring
token about once in 3,000 draws on a flat distribution; the race changes its winner only when the
two best perturbed scores are that close, as greedy only flips on a near tie.

    process_logits(logits [N, V], options) -> probs [N, V]        temperature, top-k, top-p
    keyed_uniforms(seed, positions [N], keys [N, K]) -> [N, K]     counter-based (SplitMix64), any device
    draw(probs [N, V], seed, positions [N]) -> [N]                 the race, exact in distribution
"""

from __future__ import annotations

import torch

from runtime.decoding import DecodingOptions

# SplitMix64 constants as signed int64 (torch has no uint64 arithmetic; products wrap mod 2^64).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
KEY_BITS = 32            # counter = position << 32 | key: keys are token ids (vocabularies < 2^32)

# The race is run among the RACE most likely kept tokens plus one entry standing for all the other
# kept tokens (their total mass); only when that entry wins are the others raced, so a step hashes
# RACE keys per node instead of the whole vocabulary. The same size bounds the top-p search before
# a full sort.
RACE = 256


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def keyed_uniforms(seed: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[N, K] float64 uniforms in [0, 1): SplitMix64 of (seed, positions[n] << 32 | keys[n, k]).
    The same on every device and for every method, whatever else was drawn before."""
    counter = (positions.to(torch.int64).unsqueeze(-1) << KEY_BITS) | keys.to(torch.int64)
    z = counter * _GOLDEN + (seed & ((1 << 63) - 1))
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def _gumbel(seed: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[N, K] standard Gumbel noise keyed like keyed_uniforms (u = 0 gives -inf: never wins)."""
    return -torch.log(-torch.log(keyed_uniforms(seed, positions, keys)))


def _nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[N, 1] the probability of each row's crossing token: the smallest set of most likely tokens
    whose mass reaches top_p ends with it. Searched among the RACE most likely tokens; a row whose
    nucleus is larger sorts only its tokens of probability >= (1 - top_p) / V: all the others together
    weigh less than 1 - top_p, so the crossing token is among them."""
    top = torch.topk(probs, min(RACE, probs.shape[-1]), dim=-1).values
    found = torch.cumsum(top.double(), dim=-1) >= top_p
    floor = top.gather(-1, found.int().argmax(dim=-1, keepdim=True))   # first index reaching top_p
    for row in torch.nonzero(~found[:, -1]).flatten().tolist():
        row_probs = probs[row]
        ranked = torch.sort(row_probs[row_probs >= (1.0 - top_p) / row_probs.numel()], descending=True).values
        reach = torch.cumsum(ranked.double(), dim=0) >= top_p
        # (rounding can leave the whole set just short of top_p: then it is all kept)
        floor[row, 0] = ranked[int(reach.int().argmax()) if bool(reach.any()) else -1]
    return floor


def process_logits(logits: torch.Tensor, options: DecodingOptions) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities: divide by the temperature, keep the top_k most
    likely tokens, then the smallest set of most likely tokens whose mass reaches top_p (the token
    that crosses it included), renormalised. Ties at the k-th value or at the crossing token's
    probability are kept, so the kept set never depends on how a sort orders equal values."""
    scores = logits.float() / options.temperature
    if options.top_k and options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if options.top_p < 1.0:
        probs = probs.masked_fill(probs < _nucleus_floor(probs, options.top_p), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, seed: int, positions: torch.Tensor, race: int = RACE) -> torch.Tensor:
    """[N] token ids drawn from the rows of `probs` [N, V], row n with the noise keyed by
    (seed, positions[n]); never a token of probability 0.

    The `race` most likely tokens race with Gumbels keyed by their token ids; the other kept tokens
    race as one entry of their total mass q, keyed by V. By the Gumbel-max property the entry wins
    with probability q and token c with probability p_c. When the entry wins, the other tokens race
    among themselves (same keys, disjoint tokens, so independent of the first race) and token i wins
    with probability p_i / q: every token is drawn with probability p_i exactly."""
    rows, vocab = probs.shape
    positions = positions.to(probs.device)
    top, ids = torch.topk(probs, min(race, vocab), dim=-1)                          # [N, R] descending
    rest = probs.scatter(-1, ids, 0.0)                                              # [N, V] the others
    rest_mass = rest.sum(dim=-1, dtype=torch.float64)                               # [N] q, 0 if none
    scores = torch.cat([top.double().log(), rest_mass.log().unsqueeze(-1)], dim=-1)  # [N, R + 1]
    keys = torch.cat([ids, torch.full((rows, 1), vocab, device=probs.device)], dim=-1)
    winner = (scores + _gumbel(seed, positions, keys)).argmax(dim=-1, keepdim=True)
    tokens = keys.gather(-1, winner).squeeze(-1)
    for row in torch.nonzero(tokens == vocab).flatten().tolist():   # the rest won: race its kept tokens
        kept = torch.nonzero(rest[row]).flatten()
        noisy = rest[row, kept].double().log() + _gumbel(seed, positions[row: row + 1], kept.unsqueeze(0))[0]
        tokens[row] = kept[noisy.argmax()]
    return tokens


class SamplingVerifier:
    """Chooses, after each candidate node, the token plain sampling would draw at the next position."""

    def __init__(self, options: DecodingOptions, seed: int) -> None:
        self.options, self.seed = options, seed

    def choose(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The token after a node at position p sits at p + 1: its draw is keyed by p + 1.
        return draw(process_logits(logits, self.options), self.seed, positions + 1)
