import numpy as np
import pytest
import torch

from runtime.kv_cache import ContextOverflowError, KVCache


def make_new(num_layers=2, t=5, heads=1, dim=3, offset=0.0):
    # entry value = 100 * layer + node (+ offset), so every copied row identifies its source
    base = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1) + 100 * torch.arange(num_layers).view(-1, 1, 1, 1)
    return base.expand(num_layers, t, heads, dim).clone() + offset


def test_commit_keeps_exactly_the_accepted_entries():
    cache = KVCache(num_layers=2, max_context=16, num_kv_heads=1, head_dim=3)
    slot = cache.open()
    cache.commit(slot, make_new(t=3), make_new(t=3) + 0.5, [0, 1, 2])       # prefill of 3 tokens
    new_k = make_new(t=5)
    cache.commit(slot, new_k, new_k + 0.5, [0, 2, 4])                       # a tree step accepting root, node 2, node 4
    keys, values = cache.past()
    assert cache.length(slot) == 6 and cache.used == 6 and cache.alone(slot)
    assert keys[0][:, 0, 0].tolist() == [0, 1, 2, 0, 2, 4]
    assert keys[1][:, 0, 0].tolist() == [100, 101, 102, 100, 102, 104]
    assert values[1][:, 0, 0].tolist() == [100.5, 101.5, 102.5, 100.5, 102.5, 104.5]
    assert all(k.shape == (6, 1, 3) for k in keys)
    # rejected nodes (1, 3) never appear in the committed prefix
    assert 1 not in keys[0][3:, 0, 0].tolist() and 3 not in keys[0][3:, 0, 0].tolist()
    assert cache.positions[:6].tolist() == list(range(6))


def test_past_views_share_storage_and_are_contiguous():
    cache = KVCache(num_layers=2, max_context=8, num_kv_heads=2, head_dim=4)
    slot = cache.open()
    cache.commit(slot, make_new(t=2, heads=2, dim=4), make_new(t=2, heads=2, dim=4), [0, 1])
    keys, _ = cache.past()
    assert keys[1].is_contiguous()
    assert keys[1].data_ptr() == cache.keys[1].data_ptr()


def test_overflow_is_a_clear_error():
    cache = KVCache(num_layers=1, max_context=4, num_kv_heads=1, head_dim=1)
    slot = cache.open()
    cache.commit(slot, make_new(1, 3, 1, 1), make_new(1, 3, 1, 1), [0, 1, 2])
    with pytest.raises(ContextOverflowError, match="max_context"):
        cache.commit(slot, make_new(1, 3, 1, 1), make_new(1, 3, 1, 1), [0, 1])


def test_sequences_interleave_cells_and_closing_one_moves_no_other():
    """Two sequences commit in turns: each keeps its own cells in position order; closing one frees its
    cells for the next sequence without touching the other's entries."""
    cache = KVCache(num_layers=1, max_context=8, num_kv_heads=1, head_dim=1, capacity=16)
    a, b = cache.open(), cache.open()
    cache.commit(a, make_new(1, 2, 1, 1, 10), make_new(1, 2, 1, 1, 10), [0, 1])      # a: 10, 11 -> cells 0, 1
    cache.commit(b, make_new(1, 3, 1, 1, 20), make_new(1, 3, 1, 1, 20), [0, 1, 2])   # b: 20, 21, 22 -> cells 2-4
    cache.commit(a, make_new(1, 3, 1, 1, 30), make_new(1, 3, 1, 1, 30), [0, 2])      # a: 30, 32 -> cells 5, 6
    assert cache.cells(a).tolist() == [0, 1, 5, 6] and cache.cells(b).tolist() == [2, 3, 4]
    assert cache.keys[0, cache.cells(a), 0, 0].tolist() == [10, 11, 30, 32]
    assert cache.positions[:7].tolist() == [0, 1, 0, 1, 2, 2, 3]
    assert cache.used == 7 and not cache.alone(a)
    before = cache.keys[0, cache.cells(b), 0, 0].clone()
    cache.close(a)
    assert cache.used == 5 and cache.slots == (b,)
    c = cache.open()
    cache.commit(c, make_new(1, 3, 1, 1, 40), make_new(1, 3, 1, 1, 40), [0, 1, 2])   # takes a's freed cells first
    assert cache.cells(c).tolist() == [0, 1, 5]
    assert torch.equal(cache.keys[0, cache.cells(b), 0, 0], before)
    with pytest.raises(KeyError, match="not open"):
        cache.length(a)


def test_all_cells_taken_is_a_clear_error():
    cache = KVCache(num_layers=1, max_context=4, num_kv_heads=1, head_dim=1, capacity=6)
    a, b = cache.open(), cache.open()
    cache.commit(a, make_new(1, 4, 1, 1), make_new(1, 4, 1, 1), np.arange(4))
    with pytest.raises(ContextOverflowError, match="2 of 6 cells free"):
        cache.commit(b, make_new(1, 3, 1, 1), make_new(1, 3, 1, 1), np.arange(3))
