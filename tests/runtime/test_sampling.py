"""The sampling pieces: the keyed random stream, the one logits processor, the inverse-CDF draw."""

import math

import pytest
import torch

from runtime.sampling import draw, keyed_uniforms, process_logits
from runtime.verify import DecodingOptions


def test_keyed_uniforms_depend_only_on_seed_and_position():
    positions = torch.arange(10_000)
    u = keyed_uniforms(7, positions)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u[1234:1240], keyed_uniforms(7, positions[1234:1240]))   # no hidden stream state
    assert not torch.equal(u, keyed_uniforms(8, positions))
    # roughly uniform: every tenth holds ~1000 of 10000 (binomial sd ~30, bound at 5 sd)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert bool(((counts - 1000).abs() < 150).all()), counts
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_keyed_uniforms_match_a_reference_splitmix64():
    def splitmix(seed: int, position: int) -> float:
        z = (position * 0x9E3779B97F4A7C15 + seed) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
        return (z >> 11) / 2**53

    positions = torch.tensor([0, 1, 2, 1000, 2**40 + 3])
    assert keyed_uniforms(12345, positions).tolist() == [splitmix(12345, int(p)) for p in positions]


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


def test_draw_is_the_inverse_cdf_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.999999], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3]
    many = draw(torch.tensor([[0.2, 0.0, 0.8]]).expand(20_000, 3), keyed_uniforms(3, torch.arange(20_000)))
    assert 1 not in many.tolist()
    share = float((many == 0).double().mean())
    assert abs(share - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20_000)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.9)])
def test_process_logits_rows_are_independent(top_k, top_p):
    """A row's distribution does not depend on the other rows processed with it (tree steps)."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    options = DecodingOptions(temperature=0.7, top_k=top_k, top_p=top_p)
    together = process_logits(logits, options)
    for i in range(6):
        torch.testing.assert_close(together[i: i + 1], process_logits(logits[i: i + 1], options))
