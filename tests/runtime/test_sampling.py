"""The sampling pieces: the keyed random stream, the one logits processor, the Gumbel-max draw."""

import math

import pytest
import torch

from runtime.sampling import RACE, draw, keyed_uniforms, process_logits
from runtime.decoding import DecodingOptions


def test_keyed_uniforms_depend_only_on_seed_position_and_key():
    positions = torch.arange(10_000)
    keys = torch.zeros(10_000, 1, dtype=torch.int64)
    u = keyed_uniforms(7, positions, keys)[:, 0]
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u[1234:1240], keyed_uniforms(7, positions[1234:1240], keys[1234:1240])[:, 0])  # no state
    assert not torch.equal(u, keyed_uniforms(8, positions, keys)[:, 0])
    assert not torch.equal(u, keyed_uniforms(7, positions, keys + 1)[:, 0])
    # roughly uniform: every tenth holds ~1000 of 10000 (binomial sd ~30, bound at 5 sd)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert bool(((counts - 1000).abs() < 150).all()), counts
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_keyed_uniforms_match_a_reference_splitmix64():
    def splitmix(seed: int, position: int, key: int) -> float:
        z = (((position << 32) | key) * 0x9E3779B97F4A7C15 + seed) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
        return (z >> 11) / 2**53

    positions = torch.tensor([0, 1, 2, 1000, 2**30 + 3])
    keys = torch.tensor([[0, 5], [1, 49_151], [7, 0], [3, 2], [9, 2**31]])
    assert keyed_uniforms(12345, positions, keys).tolist() == [[splitmix(12345, int(p), int(k)) for k in row]
                                                               for p, row in zip(positions, keys)]


def test_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    same = process_logits(logits, DecodingOptions(temperature=1.0))
    torch.testing.assert_close(same, torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    hot = process_logits(logits, DecodingOptions(temperature=2.0))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]).sqrt()
    torch.testing.assert_close(hot, (expected / expected.sum()).unsqueeze(0))
    top2 = process_logits(logits, DecodingOptions(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.25 crosses it: the crossing token is kept
    nucleus = process_logits(logits, DecodingOptions(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(nucleus, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    exact = process_logits(logits, DecodingOptions(temperature=1.0, top_p=0.75))   # mass exactly 0.75: 2 kept
    assert int((exact > 0).sum()) == 2
    one = process_logits(logits, DecodingOptions(temperature=1.0, top_p=0.01))
    torch.testing.assert_close(one, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("temperature", [0.3, 3.0])   # nucleus within the first RACE tokens, and beyond
def test_top_p_keeps_the_smallest_set_reaching_p_as_a_full_sort_does(temperature):
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(4))
    probs = process_logits(logits, DecodingOptions(temperature=temperature, top_p=0.9))
    full = torch.softmax(logits / temperature, dim=-1).double().numpy()
    for row, kept in zip(full, probs > 0):
        order = row.argsort()[::-1]
        size = int((row[order].cumsum() < 0.9).sum()) + 1      # through the crossing token
        assert sorted(kept.nonzero().flatten().tolist()) == sorted(order[:size].tolist())
    widest = int((probs > 0).sum(dim=-1).max())
    assert (widest > RACE) == (temperature > 1)   # both the race-sized search and the full sort ran


@pytest.mark.parametrize("race", [1, 2, 8])
def test_draw_follows_the_distribution_and_never_draws_a_zero(race):
    """The race among the `race` most likely tokens plus one entry for the rest is exact whether the
    winner is raced directly or found in the second race among the rest."""
    probs = torch.tensor([0.05, 0.0, 0.4, 0.2, 0.0, 0.15, 0.1, 0.1])
    runs = 20_000
    tokens = draw(probs.expand(runs, 8), 3, torch.arange(runs), race=race)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[1] == counts[4] == 0
    expected = probs.double() * runs
    kept = expected > 0
    stat = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert stat < 5 + 5 * math.sqrt(2 * 5) + 10, (stat, counts.tolist())   # chi-square, 5 dof, ~1e-6 bound


def test_draw_is_keyed_by_seed_and_position_only():
    """The same row at the same position draws the same token alone or among others, and a different
    position or seed draws independently."""
    probs = torch.softmax(torch.randn(4, 300, generator=torch.Generator().manual_seed(1)), dim=-1)
    positions = torch.tensor([10, 11, 12, 13])
    together = draw(probs, 5, positions, race=16)
    for i in range(4):
        assert draw(probs[i: i + 1], 5, positions[i: i + 1], race=16).item() == together[i].item()
    many = torch.stack([draw(probs, seed, positions, race=16) for seed in range(50)])
    assert len({tuple(row.tolist()) for row in many}) > 40


def test_draw_ignores_rounding_in_other_tokens():
    """Rounding noise in the logits (a tree step against a one-token step) moves the draw only when
    the two best perturbed scores are that close, not with every token's noise as an inverse CDF did."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2000, 4000, generator=g)
    noisy = logits + 1e-5 * torch.randn(2000, 4000, generator=g)
    options = DecodingOptions(temperature=1.0)
    positions = torch.arange(2000)
    same = draw(process_logits(logits, options), 9, positions) == draw(process_logits(noisy, options), 9, positions)
    assert int((~same).sum()) <= 2


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.9)])
def test_process_logits_rows_are_independent(top_k, top_p):
    """A row's distribution does not depend on the other rows processed with it (tree steps)."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    options = DecodingOptions(temperature=0.7, top_k=top_k, top_p=top_p)
    together = process_logits(logits, options)
    for i in range(6):
        torch.testing.assert_close(together[i: i + 1], process_logits(logits[i: i + 1], options))
