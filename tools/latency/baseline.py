"""A latency baseline: one measurement of the latency regression test (tools/latency/regression.py), kept
next to the method checkpoints as regression-baseline-<device key>-<backend>.json, with what it pinned."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from export.methods import METHODS
from tools.latency.profile import DEFAULT_CONTEXT
from trees._json import check_format, fields_of, read_json_file, write_json
from trees.quiet import Quietness


BASELINE_FORMAT = "ppdeploy-latency-baseline"


BASELINE_METHODS = ("vanilla", "ppd", "ht")


class BaselineError(ValueError):
    """A latency baseline that cannot be read or used, with the reason and the fix."""


@dataclass(frozen=True)
class LatencyTestConfig:
    """What a latency test measures; a baseline records it and the test repeats exactly it."""
    sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    context: int = DEFAULT_CONTEXT
    latency_repeats: int = 20        # timed steps per size, over `rounds` sweeps of all sizes
    rounds: int = 5
    prompts: str = "mtbench"
    limit: int = 4
    max_new_tokens: int = 48
    bench_repeats: int = 3           # interleaved; medians reported
    methods: tuple[str, ...] = BASELINE_METHODS
    dtype: str = "fp32"              # torch backend precision (runtime/backends DTYPES)

    def __post_init__(self) -> None:
        if not self.sizes or self.sizes[0] != 1 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"latency sizes must start at 1 and increase, got {list(self.sizes)}")
        if "vanilla" not in self.methods:
            raise ValueError("the latency test needs vanilla (speedups are over vanilla)")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "sizes": list(self.sizes), "methods": list(self.methods)}

    @classmethod
    def from_json(cls, data: dict) -> "LatencyTestConfig":
        return cls(**{**data, "sizes": tuple(data["sizes"]), "methods": tuple(data["methods"])})


@dataclass(frozen=True)
class MethodRun:
    tokens_per_s: float              # median over repeats
    tokens_per_s_repeats: tuple[float, ...]
    tokens: int                      # new tokens over all prompts (first repeat)
    steps: int                       # forward passes over all prompts, prefills included
    matches_vanilla: int | None      # prompts whose tokens equal vanilla's

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.steps


@dataclass(frozen=True)
class Measurement:
    device_key: str
    device_name: str
    backend: str
    versions: dict[str, str]
    inputs: dict                     # what the numbers depend on besides code: model fingerprint, per method
                                     # checkpoint sha256 and tree file (name, content sha256)
    config: LatencyTestConfig
    latency: dict[int, float]        # median seconds per step at each T
    bench: dict[str, MethodRun]
    quiet: Quietness
    command: str = ""                # what recorded it (a baseline)

    @property
    def ratios(self) -> dict[int, float]:
        """T=k / T=1 step latency."""
        return {t: s / self.latency[1] for t, s in self.latency.items()}

    @property
    def speedups(self) -> dict[str, float]:
        """tokens/s over vanilla's, same run."""
        base = self.bench["vanilla"].tokens_per_s
        return {m: r.tokens_per_s / base for m, r in self.bench.items()}

    def to_json(self) -> dict:
        return {
            "format": BASELINE_FORMAT, "command": self.command,
            "device_key": self.device_key, "device_name": self.device_name, "backend": self.backend,
            "versions": dict(self.versions), "inputs": self.inputs, "config": self.config.to_json(),
            "quiet": self.quiet.to_json(),
            "latency_ms": {str(t): round(1e3 * s, 4) for t, s in self.latency.items()},
            "latency_ratios": {str(t): round(r, 4) for t, r in self.ratios.items()},
            "bench": {m: {"tokens_per_s": round(r.tokens_per_s, 3),
                          "tokens_per_s_repeats": [round(x, 3) for x in r.tokens_per_s_repeats],
                          "speedup": round(self.speedups[m], 4), "tokens": r.tokens, "steps": r.steps,
                          "mean_accepted": round(r.mean_accepted, 4), "matches_vanilla": r.matches_vanilla}
                      for m, r in self.bench.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "Measurement":
        check_format(data, BASELINE_FORMAT, BaselineError, "a latency baseline",
                     "record one with `python -m tools latency-baseline --gpu <device>`")
        with fields_of(BaselineError, "latency baseline JSON is missing or has a bad field"):
            return cls(str(data["device_key"]), str(data["device_name"]), str(data["backend"]), dict(data["versions"]),
                       dict(data["inputs"]), LatencyTestConfig.from_json(data["config"]),
                       {int(t): float(ms) / 1e3 for t, ms in data["latency_ms"].items()},
                       {m: MethodRun(float(r["tokens_per_s"]), tuple(r["tokens_per_s_repeats"]), int(r["tokens"]),
                                     int(r["steps"]), r.get("matches_vanilla")) for m, r in data["bench"].items()},
                       Quietness.from_json(data["quiet"]), str(data.get("command", "")))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())


def load_baseline(path: str | Path) -> Measurement:
    return Measurement.from_json(read_json_file(path, BaselineError, "latency baseline",
                                                "record one with `python -m tools latency-baseline --gpu <device>`"))


def baseline_filename(key: str, backend: str) -> str:
    return f"regression-baseline-{key}-{backend}.json"


def baseline_dir() -> Path:
    """Next to the method checkpoints (all trained methods share one dir)."""
    return Path(METHODS["ppd"].default_checkpoint).parent


def record_command(gpu: str, backend: str) -> str:
    return f"make latency-baseline GPU={gpu} LATENCY_BACKEND={backend}"


def default_baseline_path(key: str, backend: str) -> Path:
    return baseline_dir() / baseline_filename(key, backend)
