"""One-token step latency of each onnxruntime CPU engine variant against its bandwidth floor:
`python -m tools floor`: how close a variant's step is to what its weights allow.

A one-token decode step multiplies by every weight once, so it reads at least the bytes of the
graph's initializers, less the tables it only gathers from (the embedding: T rows of it per step).
At the machine's measured read bandwidth those bytes take the floor:

    floor = step weight bytes / read bandwidth          share of the floor = floor / measured T=1

The measured T=1 is the variant's committed latency profile (`python -m tools trees profile`: the
runtime's step with host work, at a 300-token cache, whose keys and values are read too and are not
in the floor). The read bandwidth: torch summing a buffer far larger than the caches on every core,
the median of several passes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

READ_BUFFER_MIB = 1024      # far beyond any CPU cache
READ_PASSES = 9


@dataclass(frozen=True)
class FloorRow:
    variant: str
    weight_bytes: int           # read by a one-token step
    floor_s: float              # weight_bytes / read bandwidth
    t1_s: float                 # the profile's T=1 step
    profile: str                # the profile file it came from

    @property
    def share(self) -> float:
        """floor / T=1: 1.0 is a step that does nothing but stream its weights."""
        return self.floor_s / self.t1_s

    def to_json(self) -> dict:
        return {"variant": self.variant, "weight_bytes": self.weight_bytes, "floor_ms": round(1e3 * self.floor_s, 3),
                "t1_ms": round(1e3 * self.t1_s, 3), "share_of_floor": round(self.share, 4), "profile": self.profile}


def step_weight_bytes(onnx_path: str | Path) -> int:
    """Bytes of the initializers a one-token step of the graph reads in full: all of them but the
    tables only Gather nodes read (as their data input)."""
    import numpy as np
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    gathered_only = {init.name for init in graph.initializer}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in gathered_only and not (node.op_type == "Gather" and slot == 0):
                gathered_only.discard(name)
    return sum(int(np.prod(init.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
               for init in graph.initializer if init.name not in gathered_only)


def measure_read_bandwidth(threads: int | None = None, mib: int = READ_BUFFER_MIB, passes: int = READ_PASSES) -> float:
    """Bytes per second that summing a `mib` MiB fp32 buffer reads on `threads` torch threads (default:
    every core), the median over `passes` after one warm-up pass."""
    import torch

    if mib < 1 or passes < 1:
        raise ValueError(f"the read bandwidth needs mib >= 1 and passes >= 1, got {mib} and {passes}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        buffer = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        buffer.sum()
        seconds = []
        for _ in range(passes):
            start = time.perf_counter()
            buffer.sum()
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return buffer.numel() * 4 / statistics.median(seconds)


def floor_rows(engines: Sequence[tuple[str, Path, float, str]], bandwidth: float) -> list[FloorRow]:
    """One row per (variant, graph path, T=1 seconds, profile name)."""
    if bandwidth <= 0:
        raise ValueError(f"read bandwidth must be positive, got {bandwidth}")
    rows = []
    for variant, graph, t1, profile in engines:
        weights = step_weight_bytes(graph)
        rows.append(FloorRow(variant, weights, weights / bandwidth, t1, profile))
    return rows


def format_floor(rows: Sequence[FloorRow], bandwidth: float) -> str:
    lines = [f"read bandwidth {bandwidth / 1e9:.1f} GB/s", "",
             "| variant | weights read per step | floor | T=1 (profile) | share of the floor |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.variant} | {r.weight_bytes / 1e6:.0f} MB | {1e3 * r.floor_s:.2f} ms | {1e3 * r.t1_s:.2f} ms | "
              f"{r.share:.0%} |" for r in rows]
    return "\n".join(lines)


def variant_engines(model_dir: str | Path, variants: Sequence[str]) -> list[tuple[str, Path, float, str]]:
    """(variant, vanilla graph, T=1 seconds, profile file) of each variant on the CPU; every missing
    engine or profile is named at once, with the command that makes it."""
    from export.manifest import Manifest
    from tools.treesearch.acceptance import method_checkpoint
    from tools.treesearch.files import find_profile
    from export.tree_store import search_dirs
    from trees.latency import load_profile

    checkpoints = method_checkpoint("ppd", None).parent
    engines, missing = [], []
    for variant in variants:
        directory, absent = vanilla_engine_dir(model_dir, variant)
        profile = find_profile(search_dirs(checkpoints), "cpu", "onnxruntime", variant)
        if absent:
            missing.append(absent)
        if profile is None:
            missing.append(f"no {variant} onnxruntime CPU latency profile in {checkpoints}: "
                           f"`python -m tools trees profile --gpu cpu --backend onnxruntime --variant {variant}`")
        if not missing:
            engines.append((variant, Manifest.load(directory, verify_files=False).onnx_path,
                            load_profile(profile).latency(1), profile.name))
    if missing:
        raise FileNotFoundError("; ".join(missing))
    return engines


def vanilla_engine_dir(model_dir: str | Path, variant: str) -> tuple[Path, str | None]:
    """The variant's vanilla CPU engine dir, and what to run to make it when it holds none (else None)."""
    from export.engine import engine_dir
    from export.manifest import MANIFEST_NAME
    from export.quantize import check_variant

    directory = engine_dir(model_dir, "cpu", "vanilla", check_variant(variant))
    if (directory / MANIFEST_NAME).is_file():
        return directory, None
    return directory, f"no {variant} vanilla engine at {directory}: `make engine GPU=cpu QUANT={variant}`"
