"""TensorRT optimization profiles from the manifest: one per manifest profile, in the manifest's
order (decode, then prefill), so a profile's index in the engine is its position here.

Each input gets (min, opt, max) shapes from `Manifest.profile_shapes`; the only change is decode's
opt T, which becomes the size of the tree installed for the device (TensorRT tunes its kernels for
opt, and the decode loop runs that tree on almost every step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from export.manifest import CACHE_AXIS, TREE_AXIS, AxisRange, Manifest, ManifestError, ShapeError
from trees import load_ppd_trees

DECODE = "decode"
Shapes = dict[str, tuple[list[int], list[int], list[int]]]   # input name -> (min, opt, max)


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile: its axis ranges (for picking it at run time) and its input shapes."""

    name: str
    axes: dict[str, AxisRange]         # T, S
    shapes: Shapes

    def covers(self, tree_size: int, cache_length: int) -> bool:
        return tree_size in self.axes[TREE_AXIS] and cache_length in self.axes[CACHE_AXIS]

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


def engine_profiles(manifest: Manifest, decode_opt_tree: int | None = None) -> tuple[EngineProfile, ...]:
    """The engine's profiles; `decode_opt_tree` (the installed tree's T; None keeps the manifest's
    opt) is clamped into decode's T range."""
    profiles = {name: dict(axes) for name, axes in manifest.profiles.items()}
    if decode_opt_tree is not None:
        if DECODE not in profiles:
            raise ManifestError(f"{manifest.dir} has no {DECODE!r} profile (profiles: {', '.join(profiles)}); re-export it")
        t = profiles[DECODE][TREE_AXIS]
        profiles[DECODE][TREE_AXIS] = AxisRange(t.min, min(max(decode_opt_tree, t.min), t.max), t.max)
    tuned = dataclasses.replace(manifest, profiles=profiles)
    return tuple(EngineProfile(name, axes, tuned.profile_shapes(name)) for name, axes in profiles.items())


def select_profile(profiles: tuple[EngineProfile, ...], tree_size: int, cache_length: int) -> int:
    """Index of the first profile covering a step of T new tokens over S cached (decode before
    prefill, so decode steps keep decode's tuned kernels)."""
    for index, profile in enumerate(profiles):
        if profile.covers(tree_size, cache_length):
            return index
    ranges = "; ".join(f"{p.name}: T {p.axes[TREE_AXIS].min}..{p.axes[TREE_AXIS].max}, "
                       f"S {p.axes[CACHE_AXIS].min}..{p.axes[CACHE_AXIS].max}" for p in profiles)
    raise ShapeError(f"no optimization profile covers T={tree_size}, S={cache_length} ({ranges})")
