"""The committed KV cache: preallocated once, grown only by commits of accepted tree nodes."""

from __future__ import annotations

import torch


class ContextOverflowError(ValueError):
    """More tokens than the cache was allocated for."""


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

    def commit(self, new_keys: torch.Tensor, new_values: torch.Tensor, nodes: list[int]) -> None:
        """Append the entries of tree `nodes` (in order) from a step's new_keys/new_values [L, T, Hkv, D]."""
        n = len(nodes)
        if self.length + n > self.max_context:
            raise ContextOverflowError(
                f"KV cache full: {self.length} + {n} entries > max_context {self.max_context}; "
                "load the model with a larger max_context"
            )
        start, end = self.length, self.length + n
        if nodes == list(range(nodes[0], nodes[0] + n)):  # a contiguous run (prefill, chains): slice, no gather
            self.keys[:, start:end] = new_keys[:, nodes[0]: nodes[0] + n]
            self.values[:, start:end] = new_values[:, nodes[0]: nodes[0] + n]
        else:
            index = torch.as_tensor(nodes, device=new_keys.device)
            self.keys[:, start:end] = new_keys.index_select(1, index)
            self.values[:, start:end] = new_values.index_select(1, index)
        self.length = end
