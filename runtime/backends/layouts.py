"""Device tensors of draft layouts, built once per layout key and kept in a bounded LRU (n-gram
trees vary from step to step; PPD's per-m layouts and vanilla's chain repeat forever)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from export.step_model import lowest_mask_value
from runtime.draft import Layout

DEFAULT_CAPACITY = 64


@dataclass(frozen=True)
class DeviceLayout:
    """A Layout's tensors on the backend's device, built once per layout key."""

    depth: torch.Tensor          # [T] int64
    mask: torch.Tensor           # [T, T] additive (0 = visible, dtype's lowest finite value = hidden)
    predict_rows: torch.Tensor   # [G, k] int64


class LayoutCache:
    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = DEFAULT_CAPACITY) -> None:
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self._entries: OrderedDict[tuple, DeviceLayout] = OrderedDict()

    def get(self, layout: Layout) -> DeviceLayout:
        entry = self._entries.get(layout.key)
        if entry is not None:
            self._entries.move_to_end(layout.key)
            return entry
        entry = self._build(layout)
        self._entries[layout.key] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def _build(self, layout: Layout) -> DeviceLayout:
        visible = torch.from_numpy(layout.buffers.ancestor_mask.copy())
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, lowest_mask_value(self.dtype))
        return DeviceLayout(depth=torch.from_numpy(layout.buffers.depth.copy()).to(self.device),
                            mask=mask.to(self.device),
                            predict_rows=torch.from_numpy(layout.predict_rows.copy()).to(self.device))

    def __len__(self) -> int:
        return len(self._entries)
