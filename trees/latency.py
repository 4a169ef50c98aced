"""Step latency against tree size on one device and backend: the cost side of the tree search.

Measured by `tools.latency.profile.profile_step_latency` (`python -m tools trees profile`): the median seconds
of one decode step with T tokens (candidates + prompt tokens) over a fixed committed context.
`latency(T)` reads a monotone fit of the medians (isotonic: a bigger tree is never cheaper; on a
busy machine single medians jitter) and interpolates linearly between measured sizes.

A profile may also hold batched steps (`batch`): for B sequences stepped together (packed,
runtime/backends/packing.py), the median seconds of a step in which each carries a tree of T tokens,
over T in the profile's sizes up to B T <= its largest size. `batch_latency(B)` is then the cost of a
step as a function of each sequence's tree size: what the tree search for B sequences at a time needs
(a per-sequence rate of E(tree) / L_B(T)).

A profile is "measured" (on the device it names), or "roofline": modelled from a GPU's datasheet by
trees/roofline.py for a GPU this machine does not have, with the table row used in `roofline`.
A measured profile always wins over a modelled one (tools/treesearch/files.py find_profile).

`variant` is the engine's weight quantization (export/quantize.py: fp32, int8, int4): a quantized
onnxruntime engine steps at another cost per tree size, so each variant has its own profile; a
profile that records none was measured on fp32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trees._json import check_format, fields_of, read_json_file, write_json
from trees.devices import DEFAULT_VARIANT, engine_label
from trees.quiet import Quietness

PROFILE_FORMAT = "ppdeploy-latency-profile"
MEASURED, ROOFLINE = "measured", "roofline"       # LatencyProfile.source


class ProfileError(ValueError):
    """A latency profile that cannot be used, with the reason and the fix."""


def monotone_fit(values: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in np.asarray(values, dtype=np.float64):
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


@dataclass(frozen=True)
class LatencyProfile:
    device_key: str                      # trees.devices.device_key: names the files
    device_name: str                     # the real name (GPU name, or CPU model with cores/threads)
    backend: str                         # torch | onnxruntime | ...
    sizes: tuple[int, ...]               # T, strictly increasing, starting at 1 (vanilla)
    seconds: tuple[float, ...]           # median seconds per step at each T
    repeats: int
    context: int                         # committed cache entries during the measurement
    model_fingerprint: str
    versions: tuple[tuple[str, str], ...] = ()   # (library, version) of what ran the step
    source: str = MEASURED                       # MEASURED, or ROOFLINE (modelled: trees/roofline.py)
    roofline: tuple[tuple[str, str | float], ...] = ()   # a modelled profile's GPU row and model terms
    quiet: Quietness | None = None               # how quiet its machine was (trees/quiet.py); None: not
                                                 # recorded (profiles from before the field, modelled ones)
    variant: str = DEFAULT_VARIANT               # the engine's weights (export/quantize.py VARIANTS)
    graph_sha256: str | None = None              # the exported graph timed (runtime ModelInfo); None: the
                                                 # torch step, a modelled profile, or not recorded
    cpu_isa: str | None = None                   # a CPU's vector extensions (export/devices.py cpu_isa): CPUs
                                                 # share the key "cpu"; None: a GPU's, or not recorded
    # ((B, (seconds at sizes[0], sizes[1], ...)), ...): batched steps of B sequences, B > 1, each with a
    # tree of `sizes[i]` tokens; as many sizes as were measured for that B (at least 1)
    batch: tuple[tuple[int, tuple[float, ...]], ...] = ()
    dtype: str = "fp32"                          # the torch backend's precision (fp32, fp16, bf16)
    static_steps: bool = False                   # each T timed as a static step (CUDA graphs), not a dynamic one
    fitted: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        seconds = tuple(float(s) for s in self.seconds)
        if not sizes or len(sizes) != len(seconds):
            raise ProfileError(f"a latency profile needs one median per size, got {len(sizes)} sizes and "
                               f"{len(seconds)} medians")
        if sizes[0] != 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ProfileError(f"profile sizes must start at 1 (the vanilla step) and increase, got {list(sizes)}")
        if not all(np.isfinite(s) and s > 0 for s in seconds):
            raise ProfileError("profile medians must be positive seconds")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "seconds", seconds)
        object.__setattr__(self, "versions", tuple((str(a), str(b)) for a, b in self.versions))
        if self.source not in (MEASURED, ROOFLINE) or (self.source == ROOFLINE) != bool(self.roofline):
            raise ProfileError(f"a profile's source is {MEASURED!r} or {ROOFLINE!r} (with its roofline record), got "
                               f"{self.source!r}")
        object.__setattr__(self, "roofline", tuple((str(a), b) for a, b in self.roofline))
        fitted = monotone_fit(np.asarray(seconds))
        fitted.setflags(write=False)
        object.__setattr__(self, "fitted", fitted)
        batch = tuple((int(b), tuple(float(s) for s in times)) for b, times in self.batch)
        if any(b < 2 or not 1 <= len(times) <= len(sizes) or not all(np.isfinite(s) and s > 0 for s in times)
               for b, times in batch) or len({b for b, _ in batch}) != len(batch):
            raise ProfileError("a profile's batched steps need distinct batch sizes B >= 2, each with 1..len(sizes) "
                               "positive medians")
        object.__setattr__(self, "batch", tuple(sorted(batch)))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes with measured steps: 1 (the profile itself) and those of `batch`."""
        return (1, *(b for b, _ in self.batch))

    def batch_latency(self, batch: int):
        """tokens -> seconds of a step of `batch` sequences each with a tree of `tokens` tokens (monotone
        fit, linear between measured sizes); batch 1 is `latency`."""
        if batch == 1:
            return self.latency
        times = dict(self.batch).get(batch)
        if times is None:
            raise ProfileError(f"no batched steps of B={batch} in this profile (it has {list(self.batch_sizes)}): "
                               f"measure them with `python -m tools trees profile --batch-sizes {batch}`")
        sizes, fitted = self.sizes[: len(times)], monotone_fit(np.asarray(times))

        def latency(tokens: int) -> float:
            if not 1 <= tokens <= sizes[-1]:
                raise ProfileError(f"{tokens} tokens per sequence is outside the sizes measured for B={batch} "
                                   f"(1..{sizes[-1]})")
            return float(np.interp(tokens, sizes, fitted))
        return latency

    def batch_max_tokens(self, batch: int) -> int:
        """The largest tree per sequence measured for `batch` sequences at a time."""
        return self.max_tokens if batch == 1 else self.sizes[len(dict(self.batch)[batch]) - 1]

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    @property
    def engine(self) -> str:
        """The backend, with the variant when it is not fp32 ("onnxruntime int4"): for titles."""
        return engine_label(self.backend, self.variant)

    def check_variant(self, variant: str, path: str | Path) -> None:
        """Refuse this profile (read from `path`) for an engine of another variant: its step costs are
        another engine's."""
        if self.variant != variant:
            raise ProfileError(f"{path} was measured on the {self.variant} engine, not {variant}: its step costs are "
                               f"another engine's. Measure the {variant} one with `python -m tools trees profile "
                               f"--gpu ... --backend {self.backend} --variant {variant}` (or pass --profile of it)")

    def latency(self, tokens: int) -> float:
        """Seconds of one step with `tokens` tokens (monotone fit, linear between measured sizes)."""
        if not 1 <= tokens <= self.max_tokens:
            raise ProfileError(f"{tokens} tokens is outside the profiled sizes 1..{self.max_tokens}: "
                               f"profile larger trees with `python -m tools trees profile --max-tokens {tokens}`")
        return float(np.interp(tokens, self.sizes, self.fitted))

    def to_json(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "device_key": self.device_key,
            "device_name": self.device_name,
            "backend": self.backend,
            "variant": self.variant,
            "dtype": self.dtype,
            "static_steps": self.static_steps,
            "source": self.source,
            **({"roofline": dict(self.roofline)} if self.roofline else {}),
            "versions": dict(self.versions),
            **({"quiet": self.quiet.to_json()} if self.quiet else {}),
            "model_fingerprint": self.model_fingerprint,
            "context": self.context,
            "repeats": self.repeats,
            "sizes": list(self.sizes),
            "seconds": [round(s, 7) for s in self.seconds],
            **({"graph_sha256": self.graph_sha256} if self.graph_sha256 else {}),
            **({"cpu_isa": self.cpu_isa} if self.cpu_isa is not None else {}),
            **({"batch": {str(b): [round(s, 7) for s in times] for b, times in self.batch}} if self.batch else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> "LatencyProfile":
        check_format(data, PROFILE_FORMAT, ProfileError, "a latency profile",
                     "write one with `python -m tools trees profile`")
        with fields_of(ProfileError, "latency profile JSON is missing or has a bad field"):
            return cls(device_key=str(data["device_key"]), device_name=str(data["device_name"]),
                       backend=str(data["backend"]), sizes=tuple(data["sizes"]), seconds=tuple(data["seconds"]),
                       repeats=int(data["repeats"]), context=int(data["context"]),
                       model_fingerprint=str(data["model_fingerprint"]),
                       versions=tuple(dict(data.get("versions", {})).items()),
                       source=str(data.get("source", MEASURED)),   # profiles before the field were measured
                       roofline=tuple(dict(data.get("roofline", {})).items()),
                       quiet=Quietness.from_json(data["quiet"]) if data.get("quiet") else None,
                       variant=str(data.get("variant", DEFAULT_VARIANT)),   # profiles before the field: fp32
                       graph_sha256=data.get("graph_sha256"), cpu_isa=data.get("cpu_isa"),
                       batch=tuple((int(b), tuple(times)) for b, times in dict(data.get("batch", {})).items()),
                       dtype=str(data.get("dtype", "fp32")), static_steps=bool(data.get("static_steps", False)))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())


def load_profile(path: str | Path) -> LatencyProfile:
    return LatencyProfile.from_json(read_json_file(path, ProfileError, "latency profile",
                                                   "measure it with `python -m tools trees profile`"))
