"""The committed KV cache: preallocated once, grown only by commits of accepted tree nodes. A
backend owns one; nothing outside the backend writes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ContextOverflowError(ValueError):
    """More tokens than the cache was allocated for."""


def contiguous_runs(nodes: Sequence[int]) -> list[tuple[int, int]]:
    """[(first node, count)] of consecutive node indices, in order: a prefill or a chain is one run,
    a tree path a few. Copying runs by slice needs no index tensor on the device (no upload)."""
    runs: list[tuple[int, int]] = []
    for node in nodes:
        node = int(node)
        if runs and runs[-1][0] + runs[-1][1] == node:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((node, 1))
    return runs


class KVCache:
    """keys, values: [L, max_context, Hkv, D]; rows [0, length) are committed, the rest unused.

    A step reads `past()` (per-layer views of the committed rows, no copy) and returns the KV of
    its T tree nodes; `commit` copies only the accepted nodes' entries to the end of the prefix, so
    rejected candidates and PPD prompt tokens never become visible to later steps.
    """

    def __init__(self, num_layers: int, max_context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, max_context, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_context = max_context
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def past(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [S, Hkv, D] views of the committed entries (contiguous: layer-major layout)."""
        s = self.length
        return [k[:s] for k in self.keys], [v[:s] for v in self.values]

    def check_room(self, count: int) -> None:
        if self.length + count > self.max_context:
            raise ContextOverflowError(
                f"KV cache full: {self.length} + {count} entries > max_context {self.max_context}; "
                "load the model with a larger max_context"
            )

    def commit(self, new_keys: torch.Tensor, new_values: torch.Tensor, nodes: Sequence[int]) -> None:
        """Append the entries of tree `nodes` (in order) from a step's new_keys/new_values [L, T, Hkv, D]."""
        self.check_room(len(nodes))
        end = self.length
        for first, count in contiguous_runs(nodes):
            self.keys[:, end: end + count] = new_keys[:, first: first + count]
            self.values[:, end: end + count] = new_values[:, first: first + count]
            end += count
        self.length = end
