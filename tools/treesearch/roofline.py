"""The roofline model (trees/roofline.py) applied to a model dir: the modelled profile `make tree
GPU=<gpu>` falls back to on a machine without that GPU, and the modelled-against-measured report of
the gpu-check.

    python -m tools trees roofline --gpu h200                      the modelled step curve
    python -m tools trees roofline --gpu h200 --compare PROFILE    ... against a measured profile
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import model_fingerprint
from export.manifest import DEFAULT_MAX_TREE
from export.paths import DEFAULT_MODEL_DIR
from tools.latency.profile import DEFAULT_CONTEXT
from trees._json import write_json
from trees.config_args import option
from trees.latency import LatencyProfile, load_profile
from trees.roofline import (DEFAULT_DTYPE, DTYPE_BYTES, CurvePoint, ModelShape, RooflineError, compare_profiles,
                            format_comparison, lookup_gpu, roofline_profile, step_cost)


def model_shape(model_dir: str | Path) -> ModelShape:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise RooflineError(f"no config.json in {model_dir}: the roofline reads the model's sizes from it")
    return ModelShape.from_config(json.loads(path.read_text()))


def modelled_profile(gpu: str, backend: str, model_dir: str | Path, context: int = DEFAULT_CONTEXT,
                     max_tokens: int = DEFAULT_MAX_TREE, dtype: str = DEFAULT_DTYPE) -> LatencyProfile:
    """The roofline profile of the GPU `gpu` names (table row: trees.roofline.lookup_gpu) for the
    model in `model_dir`, keyed like a profile measured on that GPU."""
    return roofline_profile(model_shape(model_dir), lookup_gpu(gpu), backend, model_fingerprint(model_dir), context,
                            max_tokens, dtype)


def compare_with_measured(measured: LatencyProfile, model_dir: str | Path, dtype: str = DEFAULT_DTYPE,
                          gpu: str | None = None) -> list[CurvePoint]:
    """The roofline of the GPU a measured profile names (its recorded device name, or `gpu`), at its
    context and sizes, against it: per T modelled ms, measured ms and measured/modelled."""
    modelled = roofline_profile(model_shape(model_dir), lookup_gpu(gpu or measured.device_name), measured.backend,
                                measured.model_fingerprint, measured.context, measured.max_tokens, dtype)
    return compare_profiles(modelled, measured)


@dataclass(frozen=True)
class RooflineCommand:
    gpu: str | None = option(None, "a GPU of the roofline table (e.g. h200, 'NVIDIA H100 80GB HBM3'; an unknown name "
                                   "lists them); with --compare, default: the profile's own GPU")
    model_dir: str = option(str(DEFAULT_MODEL_DIR), "model checkpoint dir (its config.json gives the sizes)")
    dtype: str | None = option(None, f"weights and cache precision (default: with --compare the profile's own, "
                                     f"else {DEFAULT_DTYPE})", choices=tuple(DTYPE_BYTES))
    context: int = option(DEFAULT_CONTEXT, "committed cache entries (the profiles' default)")
    max_tokens: int = option(DEFAULT_MAX_TREE, "largest step T")
    compare: str | None = option(None, "a measured latency profile JSON to compare with (its GPU, context, sizes)")
    out: str | None = option(None, "write the curve (or the comparison) as JSON here")


def cmd_roofline(cfg: RooflineCommand, argv: list[str]) -> int:
    """The roofline model's step latency against tree size on a GPU (trees/roofline.py), or the
    modelled curve against a measured profile (what the gpu-check reports)."""
    if cfg.compare:
        measured = load_profile(cfg.compare)
        dtype = cfg.dtype or measured.dtype   # the model at the precision that was measured
        points = compare_with_measured(measured, cfg.model_dir, dtype, cfg.gpu)
        print(f"roofline ({dtype}) against {cfg.compare}: {measured.device_name}, {measured.backend} "
              f"({'static steps' if measured.static_steps else 'dynamic steps'}), context {measured.context}")
        print(format_comparison(points))
        report = {"gpu": measured.device_name, "backend": measured.backend, "dtype": dtype,
                  "static_steps": measured.static_steps,
                  "context": measured.context, "measured_profile": str(cfg.compare),
                  "points": [{"tokens": p.tokens, "modelled_ms": round(p.modelled_ms, 4),
                              "measured_ms": round(p.measured_ms, 4), "ratio": round(p.ratio, 3)} for p in points]}
    elif not cfg.gpu:
        raise RooflineError("name the GPU to model with --gpu (e.g. --gpu h200), or pass --compare PROFILE")
    else:
        cfg = dataclasses.replace(cfg, dtype=cfg.dtype or DEFAULT_DTYPE)
        shape, gpu = model_shape(cfg.model_dir), lookup_gpu(cfg.gpu)
        profile = roofline_profile(shape, gpu, "any", model_fingerprint(cfg.model_dir), cfg.context, cfg.max_tokens,
                                   cfg.dtype)
        print(f"roofline of {gpu.name} ({gpu.memory_bandwidth / 1e9:.0f} GB/s, {gpu.peak_flops(cfg.dtype) / 1e12:g} "
              f"TFLOP/s {cfg.dtype}), {shape.weight_params / 1e6:.1f}M weights, context {cfg.context}:")
        print("    T        ms  bound    memory us  compute us  overhead us")
        for t in profile.sizes:
            cost = step_cost(shape, gpu, t, cfg.context, cfg.dtype)
            print(f"{t:>5}  {1e3 * cost.seconds:>8.4f}  {cost.bound:<7}  {1e6 * cost.memory_seconds:>9.1f}  "
                  f"{1e6 * cost.compute_seconds:>10.1f}  {1e6 * cost.overhead_seconds:>11.1f}")
        report = profile.to_json()
    if cfg.out:
        write_json(cfg.out, report)
        print(f"wrote {cfg.out}")
    return 0
