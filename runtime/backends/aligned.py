"""Device buffers TensorRT accepts: every bound address non-null and 256-byte aligned, including each
layer block of the KV cache, whatever max_context is."""

from __future__ import annotations

import math

import torch

from runtime.kv_cache import KVCache

ALIGNMENT = 256   # bytes: what set_tensor_address accepts


class TrtRuntimeError(RuntimeError):
    """TensorRT refused a call (deserialize, shapes, addresses, execution), with its logged reason."""


def check_address(name: str, address: int, alignment: int = ALIGNMENT) -> None:
    """TensorRT takes any device pointer that is non-null and `alignment`-byte aligned."""
    if address == 0:
        raise TrtRuntimeError(f"{name}: a null pointer cannot be bound (an empty tensor binds a valid buffer)")
    if address % alignment:
        raise TrtRuntimeError(f"{name}: address {address:#x} is not {alignment}-byte aligned "
                              f"(offset {address % alignment}); TensorRT needs {alignment}-byte aligned tensors")


def aligned_rows(rows: int, row_bytes: int, alignment: int = ALIGNMENT) -> int:
    """The fewest rows >= `rows` whose bytes are a multiple of `alignment`, so that consecutive
    blocks of that many rows (the KV cache's layers) all start aligned."""
    step = alignment // math.gcd(alignment, row_bytes)
    return -(-rows // step) * step


def aligned_empty(numel: int, dtype: torch.dtype, device: torch.device, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A 1-D tensor of `numel` elements whose first element is `alignment`-byte aligned (CUDA's
    allocator already gives that; the CPU allocator, which the tests run on, gives 64)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(numel + alignment // itemsize, dtype=dtype, device=device)
    offset = (-raw.data_ptr() % alignment) // itemsize
    return raw[offset: offset + numel]


def aligned_cache(num_layers: int, max_context: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, capacity: int | None = None) -> KVCache:
    """A KVCache of `capacity` cells (default: max_context) whose layer blocks each start 256-byte
    aligned (rows padded up: the padding rows are never cells, never committed)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache = KVCache(num_layers, max_context, num_kv_heads, head_dim, dtype, "meta", capacity)  # storage replaced below
    rows = aligned_rows(cache.capacity, num_kv_heads * head_dim * itemsize)
    shape = (num_layers, rows, num_kv_heads, head_dim)
    cache.keys = aligned_empty(math.prod(shape), dtype, device).view(shape).zero_()
    cache.values = aligned_empty(math.prod(shape), dtype, device).view(shape).zero_()
    return cache
