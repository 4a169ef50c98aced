"""Latency regression tests per device: `make latency-test GPU=<device>` compares a fresh measurement with
the committed baseline that `make latency-baseline GPU=<device>` records.

    measure    on the device present, one backend: the step latency curve (T = 1, 4, 8, 16, 32 over 300
               committed entries; tools/latency/profile.py, rounds over all sizes) and a short bench of vanilla,
               ppd and ht in one run (tools/bench/harness.py: 4 MT-Bench prompts x 48 new tokens, greedy, repeats
               interleaved), with how quiet the machine was (trees/quiet.py)
    baseline   such a measurement, kept: regression-baseline-<device key>-<backend>.json next to the method
               checkpoints; never written from a busy machine unless forced
    compare    a measurement with the baseline of its device, backend and library versions, using the
               baseline's own settings (sizes, prompts, tokens, repeats): see Tolerances

Why next to the checkpoints: a baseline pins the same inputs as the latency profiles and searched trees
there (the model, the trained tensors, the committed tree files, by hash), so changing one of them and
re-recording the baseline land in one commit; it is named per device key and backend like them
(trees/devices.py) and records the exact device name and library versions, which must match for it to
apply. A different device or library version is not a regression: the test is skipped with the command
that records a baseline for it. Different pinned inputs (a re-searched tree, a retrained checkpoint)
fail: the committed baseline is stale and must be re-recorded with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from export.methods import METHODS
from export.paths import DEFAULT_MODEL_DIR
from tools.latency.profile import DEFAULT_CONTEXT
from trees._json import check_format, fields_of, read_json_file, write_json
from trees.quiet import Quietness

BASELINE_FORMAT = "ppdeploy-latency-baseline"
BASELINE_METHODS = ("vanilla", "ppd", "ht")


class BaselineError(ValueError):
    """A latency baseline that cannot be read or used, with the reason and the fix."""


@dataclass(frozen=True)
class Tolerances:
    """How far a ratio may move against the baseline before it is a regression, relative to the baseline's
    value. Only ratios of numbers taken in the same run are asserted: on the shared 2-core CPU the absolute
    step time moves up to 2x with load (the committed profile's T=1 44 ms against 24 ms alone), while the
    T=k/T=1 ratios and the speedups over vanilla measured on one machine state move together.

    latency_ratio  T=k / T=1 step latency may grow by 25%. Run to run it moves ~5% on a quiet CPU and up
                   to ~15% on a loaded one; a real regression of the tree step (per-node attention, a lost
                   batched GEMM: T=8 costing 2x T=1 instead of 1.5x) moves it by 30% and more.
    speedup        tokens/s of ppd or ht over vanilla may fall by 15%. The median of 3 repeats moves by a
                   few % run to run; the CPU speedups are 1.1-1.3x, so losing a third of the gain fails.
    accepted tokens and steps must not change at all: greedy decoding is deterministic."""
    latency_ratio: float = 0.25
    speedup: float = 0.15


TOLERANCES = Tolerances()


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


# --- measuring ------------------------------------------------------------------------------------------

def committed_tree(method: str, key: str, backend: str) -> Path:
    """The committed tree of a tree method for this device and backend (else its hand-picked one): the
    baseline pins committed files, never this machine's generated ones."""
    from trees.devices import find_device_tree

    spec = METHODS[method]
    return find_device_tree(Path(spec.default_checkpoint).parent, key, backend, spec.graph, spec.hand_picked_tree)


def pinned_inputs(model_dir: str | Path, methods: tuple[str, ...], trees: dict[str, Path]) -> dict:
    from export.checkpoint import model_fingerprint
    from export.manifest import sha256_file
    from export.tree_store import json_content_sha256

    inputs: dict = {"model_fingerprint": model_fingerprint(model_dir)}
    for method in methods:
        spec = METHODS[method]
        if spec.trained:
            inputs[method] = {"checkpoint_sha256": sha256_file(spec.default_checkpoint)}
        if method in trees:
            inputs[method] = {**inputs.get(method, {}), "tree": trees[method].name,
                              "tree_sha256": json_content_sha256(trees[method])}
    return inputs


def measure(gpu: str, backend: str, device: str | None = None, model_dir: str | Path = DEFAULT_MODEL_DIR,
            config: LatencyTestConfig = LatencyTestConfig(), show_progress: bool = True,
            log=print) -> Measurement:
    """The step latency curve and the bench on the device present (checked against `gpu`)."""
    from export.manifest import DEFAULT_MAX_CONTEXT
    from runtime.loading import load_pretrained
    from tools.bench.harness import BenchConfig, run_bench
    from tools.latency.profile import latency_rounds
    from runtime.methods import build_method
    from tools.treesearch.files import package_versions, present
    from transformers import AutoConfig
    from trees.devices import device_key
    from trees.quiet import load_per_core

    device, kind, name = present(gpu, device)
    key = device_key(kind, name)
    trees = {m: committed_tree(m, key, backend) for m in config.methods if METHODS[m].tree_set}
    inputs = pinned_inputs(model_dir, config.methods, trees)
    model_config = AutoConfig.from_pretrained(model_dir)
    vanilla = build_method("vanilla", model_dir, model_config.vocab_size, model_config.hidden_size)
    runner, _ = load_pretrained(backend, model_dir, vanilla, device=device, dtype=config.dtype,
                             max_context=max(DEFAULT_MAX_CONTEXT, config.context + max(config.sizes)))
    log(f"latency test on {name}, {backend}: step latency at T={list(config.sizes)}, then {config.limit} "
        f"{config.prompts} prompts x {config.max_new_tokens} tokens with {', '.join(config.methods)}")
    load_before = load_per_core()
    latency, samples = latency_rounds(runner, config.sizes, config.context, config.latency_repeats, config.rounds,
                                      show_progress)
    del runner
    report = run_bench(BenchConfig(prompts=config.prompts, methods=config.methods, backend=backend, device=device,
                                   dtype=config.dtype, max_new_tokens=config.max_new_tokens, model_dir=str(model_dir),
                                   limit=config.limit, repeats=config.bench_repeats,
                                   method_options={m: {"tree": str(path)} for m, path in trees.items()}),
                       show_progress=show_progress)
    bench = {run["method"]: MethodRun(run["tokens_per_s"], tuple(run["tokens_per_s_repeats"]),
                                      sum(len(p["token_ids"]) for p in run["prompts"]),
                                      sum(p["steps"] for p in run["prompts"]), run["matches_vanilla"])
             for run in report["runs"]}
    quiet = Quietness.measure(load_before, [*samples.values(), *(r.tokens_per_s_repeats for r in bench.values())])
    return Measurement(key, name, backend, package_versions(backend, kind), inputs, config, latency, bench, quiet)


# --- comparing ------------------------------------------------------------------------------------------

TIMING = ("latency_ratio", "speedup")


@dataclass(frozen=True)
class Regression:
    kind: str          # inputs | accepted | missing | latency_ratio | speedup (TIMING: may be the load's)
    subject: str       # "T=8", "ppd", "model_fingerprint", ...
    message: str

    @property
    def timing(self) -> bool:
        return self.kind in TIMING


@dataclass(frozen=True)
class Comparison:
    regressions: tuple[Regression, ...]   # each one fails the test
    notes: tuple[str, ...] = ()           # improvements beyond tolerance, absolute times: reported only
    table: str = ""

    @property
    def ok(self) -> bool:
        return not self.regressions


def applicability(baseline: Measurement, key: str, name: str, backend: str, versions: dict[str, str]) -> list[str]:
    """Why `baseline` does not apply to a run on this device, backend and library versions (empty: it does)."""
    problems = []
    for what, have, want in (("device", baseline.device_name, name), ("device key", baseline.device_key, key),
                             ("backend", baseline.backend, backend)):
        if have != want:
            problems.append(f"{what}: baseline {have!r}, here {want!r}")
    for library in sorted(set(baseline.versions) | set(versions)):
        if baseline.versions.get(library) != versions.get(library):
            problems.append(f"{library}: baseline {baseline.versions.get(library)}, here {versions.get(library)}")
    return problems


def compare(baseline: Measurement, measured: Measurement, tolerances: Tolerances = TOLERANCES) -> Comparison:
    """Every regression of `measured` against `baseline` at once (see Tolerances)."""
    regressions, notes = [], []
    for what in sorted(set(baseline.inputs) | set(measured.inputs)):
        if baseline.inputs.get(what) != measured.inputs.get(what):
            regressions.append(Regression("inputs", what, (
                f"inputs changed since the baseline: {what} was {baseline.inputs.get(what)}, is "
                f"{measured.inputs.get(what)}; if intended, re-record the baseline with them")))
    for t, base in baseline.ratios.items():
        if t == 1:
            continue
        if t not in measured.latency:
            regressions.append(Regression("missing", f"T={t}", f"step latency at T={t} was not measured"))
            continue
        now = measured.ratios[t]
        if now > base * (1 + tolerances.latency_ratio):
            regressions.append(Regression("latency_ratio", f"T={t}", (
                f"step latency T={t}/T=1 is {now:.3f}, baseline {base:.3f}: +{now / base - 1:.0%} > "
                f"+{tolerances.latency_ratio:.0%}")))
        elif now < base * (1 - tolerances.latency_ratio):
            notes.append(f"step latency T={t}/T=1 improved to {now:.3f} from {base:.3f}")
    for method, base_run in baseline.bench.items():
        run = measured.bench.get(method)
        if run is None:
            regressions.append(Regression("missing", method, f"{method} was not measured (the baseline has it)"))
            continue
        if (run.tokens, run.steps) != (base_run.tokens, base_run.steps):
            regressions.append(Regression("accepted", method, (
                f"{method} mean accepted tokens per step changed: {run.tokens}/{run.steps} = {run.mean_accepted:.4f}, "
                f"baseline {base_run.tokens}/{base_run.steps} = {base_run.mean_accepted:.4f} (greedy decoding is "
                f"deterministic: this is a change in what is decoded)")))
        if method == "vanilla" or "vanilla" not in measured.bench:
            continue
        base, now = baseline.speedups[method], measured.speedups[method]
        if now < base * (1 - tolerances.speedup):
            regressions.append(Regression("speedup", method, (
                f"{method} speedup over vanilla is {now:.3f}x, baseline {base:.3f}x: {now / base - 1:.0%} < "
                f"-{tolerances.speedup:.0%}")))
        elif now > base * (1 + tolerances.speedup):
            notes.append(f"{method} speedup improved to {now:.3f}x from {base:.3f}x")
    if 1 in measured.latency and "vanilla" in measured.bench:
        notes.append(f"absolute (reported, not asserted): T=1 {1e3 * measured.latency[1]:.1f} ms (baseline "
                     f"{1e3 * baseline.latency[1]:.1f}), vanilla {measured.bench['vanilla'].tokens_per_s:.1f} tokens/s "
                     f"(baseline {baseline.bench['vanilla'].tokens_per_s:.1f})")
    return Comparison(tuple(regressions), tuple(notes), format_comparison(baseline, measured))


def confirmed(comparisons: list[Comparison]) -> Comparison:
    """The last comparison, keeping a timing regression only when every attempt showed it (a slow moment
    of a shared machine does not repeat on cue; a real regression does)."""
    last = comparisons[-1]
    seen_in_all = set.intersection(*({(r.kind, r.subject) for r in c.regressions} for c in comparisons))
    kept = tuple(r for r in last.regressions if not r.timing or (r.kind, r.subject) in seen_in_all)
    dropped = [r for r in last.regressions if r not in kept]
    notes = last.notes + tuple(f"not confirmed by every attempt (ignored): {r.message}" for r in dropped)
    return Comparison(kept, notes, last.table)


def format_comparison(baseline: Measurement, measured: Measurement) -> str:
    lines = [f"{'':<24}{'baseline':>12}{'now':>12}"]
    for t in (t for t in baseline.latency if t in measured.latency):
        lines.append(f"{f'T={t} ms':<24}{1e3 * baseline.latency[t]:>12.1f}{1e3 * measured.latency[t]:>12.1f}"
                     + ("" if t == 1 else f"   T={t}/T=1 {baseline.ratios[t]:.3f} -> {measured.ratios[t]:.3f}"))
    for m, base in baseline.bench.items():
        run = measured.bench.get(m)
        if run is not None and "vanilla" in measured.bench:
            lines.append(f"{m + ' tokens/s':<24}{base.tokens_per_s:>12.1f}{run.tokens_per_s:>12.1f}   speedup "
                         f"{baseline.speedups[m]:.3f}x -> {measured.speedups[m]:.3f}x, accepted/step "
                         f"{base.mean_accepted:.4f} -> {run.mean_accepted:.4f}")
    lines.append(f"machine: baseline {baseline.quiet.summary()}")
    lines.append(f"         now      {measured.quiet.summary()}")
    return "\n".join(lines)


# --- the test and the baseline ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    skipped: str | None                   # why nothing was compared, with the command that records a baseline
    comparison: Comparison | None = None
    measurements: tuple[Measurement, ...] = ()

    @property
    def ok(self) -> bool:
        return self.comparison is None or self.comparison.ok


def default_baseline_path(key: str, backend: str) -> Path:
    return baseline_dir() / baseline_filename(key, backend)


def run_latency_test(gpu: str, backend: str, device: str | None = None, model_dir: str | Path = DEFAULT_MODEL_DIR,
                     baseline: str | Path | None = None, attempts: int = 2, show_progress: bool = True,
                     log=print) -> Outcome:
    """Measure with the baseline's settings and compare; a timing regression is measured again (up to
    `attempts` in all) and kept only if it repeats. No baseline for this device, backend and library
    versions: skipped, saying how to record one."""
    from tools.treesearch.files import package_versions, present
    from trees.devices import device_key

    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    _, kind, name = present(gpu, device)
    key = device_key(kind, name)
    path = Path(baseline) if baseline else default_baseline_path(key, backend)
    record = f"record one on a quiet machine with `{record_command(gpu, backend)}` and commit it"
    if not path.is_file():
        return Outcome(f"no latency baseline for {name} on {backend} ({path}): {record}")
    base = load_baseline(path)
    problems = applicability(base, key, name, backend, package_versions(backend, kind))
    if problems:
        return Outcome(f"the latency baseline {path} is for another setup ({'; '.join(problems)}): {record}")
    comparisons, measurements = [], []
    for attempt in range(attempts):
        measurements.append(measure(gpu, backend, device, model_dir, base.config, show_progress, log))
        comparisons.append(compare(base, measurements[-1]))
        if not any(r.timing for r in comparisons[-1].regressions):
            break
        if attempt + 1 < attempts:
            log("timing regression(s) seen: measuring again (a regression must repeat to count)")
    return Outcome(None, confirmed(comparisons), tuple(measurements))
