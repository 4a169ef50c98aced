import pytest
import torch

from runtime.kv_cache import ContextOverflowError, KVCache


def make_new(num_layers=2, t=5, heads=1, dim=3):
    # entry value = 100 * layer + node, so every copied row identifies its source
    base = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1) + 100 * torch.arange(num_layers).view(-1, 1, 1, 1)
    return base.expand(num_layers, t, heads, dim).clone()


def test_commit_keeps_exactly_the_accepted_entries():
    cache = KVCache(num_layers=2, max_context=16, num_kv_heads=1, head_dim=3)
    cache.commit(make_new(t=3), make_new(t=3) + 0.5, [0, 1, 2])       # prefill of 3 tokens
    new_k = make_new(t=5)
    cache.commit(new_k, new_k + 0.5, [0, 2, 4])                       # a tree step accepting root, node 2, node 4
    keys, values = cache.past()
    assert cache.length == 6
    assert keys[0][:, 0, 0].tolist() == [0, 1, 2, 0, 2, 4]
    assert keys[1][:, 0, 0].tolist() == [100, 101, 102, 100, 102, 104]
    assert values[1][:, 0, 0].tolist() == [100.5, 101.5, 102.5, 100.5, 102.5, 104.5]
    assert all(k.shape == (6, 1, 3) for k in keys)
    # rejected nodes (1, 3) never appear in the committed prefix
    assert 1 not in keys[0][3:, 0, 0].tolist() and 3 not in keys[0][3:, 0, 0].tolist()


def test_past_views_share_storage_and_are_contiguous():
    cache = KVCache(num_layers=2, max_context=8, num_kv_heads=2, head_dim=4)
    cache.commit(make_new(t=2, heads=2, dim=4), make_new(t=2, heads=2, dim=4), [0, 1])
    keys, _ = cache.past()
    assert keys[1].is_contiguous()
    assert keys[1].data_ptr() == cache.keys[1].data_ptr()


def test_overflow_is_a_clear_error():
    cache = KVCache(num_layers=1, max_context=4, num_kv_heads=1, head_dim=1)
    cache.commit(make_new(1, 3, 1, 1), make_new(1, 3, 1, 1), [0, 1, 2])
    with pytest.raises(ContextOverflowError, match="max_context"):
        cache.commit(make_new(1, 3, 1, 1), make_new(1, 3, 1, 1), [0, 1])
