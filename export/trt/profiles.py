"""TensorRT optimization profiles of a static-step engine: one profile per step size T, each with
min = opt = max, all over the same number of cache cells S (every cell of the cache, the ones not in use
hidden by the past mask: runtime/backends/packing.py).

Why static: with the committed length S as a dynamic axis, 60 of the 63 inputs change shape at every
step and TensorRT re-specialises; at one shape per profile it never does, the kernels chosen are the
same at every step (so a row's result depends only on its own inputs), and execute_async_v3 can be
captured in a CUDA graph once per profile. The step sizes are the installed tree's T (times each batch
size the engine serves) and a prefill chunk; longer prompts are prefilled in chunks of the largest.
A profile's index in the engine is its position here (sizes ascending).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export.manifest import CACHE_AXIS, TREE_AXIS, AxisRange, Manifest, ManifestError, ShapeError
from trees import load_ppd_trees

Shapes = dict[str, tuple[list[int], list[int], list[int]]]   # input name -> (min, opt, max)


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile: its axis ranges (for picking it at run time) and its input shapes."""

    name: str
    axes: dict[str, AxisRange]         # T, S
    shapes: Shapes

    def covers(self, tree_size: int, cache_length: int) -> bool:
        return tree_size in self.axes[TREE_AXIS] and cache_length in self.axes[CACHE_AXIS]

    @property
    def static(self) -> bool:
        return all(r.min == r.max for r in self.axes.values())

    def to_json(self) -> dict:
        return {"name": self.name, "axes": {a: dataclasses.asdict(r) for a, r in self.axes.items()},
                "shapes": {n: [list(s) for s in mom] for n, mom in self.shapes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "EngineProfile":
        return cls(str(data["name"]), {a: AxisRange(**r) for a, r in data["axes"].items()},
                   {n: tuple([int(d) for d in s] for s in mom) for n, mom in data["shapes"].items()})


def tree_size(tree_file: str | Path, ensemble: int = 1) -> int:
    """T of the largest step of a PPD/HT tree set (candidates + their prompt-token slots x ensemble)."""
    return load_ppd_trees(tree_file).max_tokens(ensemble)


def static_profiles(manifest: Manifest, sizes: Sequence[int], cells: int) -> tuple[EngineProfile, ...]:
    """One profile per step size (min = opt = max), each over `cells` cache cells; refused when the
    manifest's own ranges do not allow them (re-export with a larger --max-tree / --max-batch)."""
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if not sizes or sizes[0] < 1 or cells < 1:
        raise ManifestError(f"static steps need sizes >= 1 and cells >= 1, got {list(sizes)} and {cells}")
    largest_tree = max(axes[TREE_AXIS].max for axes in manifest.profiles.values())
    if sizes[-1] > largest_tree or cells > manifest.max_batch * manifest.max_context:
        raise ManifestError(f"{manifest.dir} takes steps of at most {largest_tree} nodes over "
                            f"{manifest.max_batch * manifest.max_context} cells, not {sizes[-1]} over {cells}: "
                            "re-export it with a larger --max-tree or --max-batch")
    profiles = []
    for size in sizes:
        axes = {TREE_AXIS: AxisRange(size, size, size), CACHE_AXIS: AxisRange(cells, cells, cells)}
        profiles.append(EngineProfile(f"T={size}", axes, manifest.input_shapes(axes)))
    return tuple(profiles)


def select_profile(profiles: tuple[EngineProfile, ...], tree_size: int, cache_length: int) -> int:
    """Index of the first profile covering a step of T nodes over S cells (sizes ascending: the smallest)."""
    for index, profile in enumerate(profiles):
        if profile.covers(tree_size, cache_length):
            return index
    ranges = "; ".join(f"{p.name}: T {p.axes[TREE_AXIS].min}..{p.axes[TREE_AXIS].max}, "
                       f"S {p.axes[CACHE_AXIS].min}..{p.axes[CACHE_AXIS].max}" for p in profiles)
    raise ShapeError(f"no optimization profile covers T={tree_size}, S={cache_length} ({ranges})")
