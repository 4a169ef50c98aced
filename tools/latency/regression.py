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

from dataclasses import dataclass
from pathlib import Path

from export.methods import METHODS
from export.paths import DEFAULT_MODEL_DIR
from tools.latency.baseline import (LatencyTestConfig, Measurement, MethodRun, default_baseline_path, load_baseline,
                                     record_command)
from tools.latency.comparison import Comparison, applicability, compare, confirmed
from trees.quiet import Quietness


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
    from tools.latency.profile import latency_rounds, profile_static_steps
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
                                max_context=max(DEFAULT_MAX_CONTEXT, config.context + max(config.sizes)),
                                static_steps=profile_static_steps(device, config.sizes, config.context))
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


# --- the test and the baseline ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    skipped: str | None                   # why nothing was compared, with the command that records a baseline
    comparison: Comparison | None = None
    measurements: tuple[Measurement, ...] = ()

    @property
    def ok(self) -> bool:
        return self.comparison is None or self.comparison.ok


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
