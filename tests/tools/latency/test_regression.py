"""Latency regression tests per device: the comparison with a baseline (synthetic baselines), the skip
without one, the refusal to keep a busy machine's numbers (baselines and `trees profile`), and the real
test of this machine against the committed CPU baseline."""

from __future__ import annotations

import json

import pytest

import tools.latency.profile
import tools.latency.regression as lr
import trees.quiet
from tools.commands import main as runtime_main
from tools.latency.baseline import LatencyTestConfig, Measurement, MethodRun, load_baseline
from tools.latency.comparison import TOLERANCES, compare, confirmed
from tools.latency.regression import run_latency_test
from tools.treesearch.files import package_versions, present
from trees.latency import load_profile
from trees.quiet import Quietness

QUIET = Quietness(0.05, 0.1, 2, 0.06, 0.12, 8)
BUSY = Quietness(0.05, 0.7, 2, 0.45, 0.9, 8)
INPUTS = {"model_fingerprint": "abc", "ppd": {"checkpoint_sha256": "p", "tree": "t.json", "tree_sha256": "1"}}


def here() -> tuple[str, str, dict]:
    """(device key, device name, versions) of this machine's CPU with onnxruntime."""
    _, kind, name = present("cpu", None)
    return "cpu", name, package_versions("onnxruntime", kind)


def synthetic(latency_ms=(20.0, 26.0, 32.0, 40.0, 56.0), tokens_per_s=None, steps=None, quiet=QUIET,
              inputs=INPUTS, versions=None) -> Measurement:
    key, name, here_versions = here()
    tokens_per_s = {"vanilla": 50.0, "ppd": 60.0, "ht": 57.0, **(tokens_per_s or {})}
    steps = {"vanilla": 192, "ppd": 150, "ht": 156, **(steps or {})}
    config = LatencyTestConfig()
    bench = {m: MethodRun(tps, (tps * 0.98, tps, tps * 1.01), 192, steps[m], 4) for m, tps in tokens_per_s.items()}
    return Measurement(key, name, "onnxruntime", versions or here_versions, inputs, config,
                       {t: ms / 1e3 for t, ms in zip(config.sizes, latency_ms)}, bench, quiet, "test")


def test_identical_measurement_passes():
    result = compare(synthetic(), synthetic())
    assert result.ok and result.regressions == ()
    assert any("absolute (reported, not asserted)" in n for n in result.notes)


def test_absolute_times_are_not_asserted():
    """Everything twice as slow (a loaded machine): same ratios, same speedups: no regression."""
    slow = synthetic(latency_ms=(40.0, 52.0, 64.0, 80.0, 112.0), tokens_per_s={"vanilla": 25.0, "ppd": 30.0, "ht": 28.5})
    assert compare(synthetic(), slow).ok


def test_latency_ratio_regression_beyond_tolerance_fails():
    grown = 26.0 / 20.0 * (1 + TOLERANCES.latency_ratio) * 1.05 * 20.0     # T=4 just past the tolerance
    within = 26.0 / 20.0 * (1 + TOLERANCES.latency_ratio) * 0.95 * 20.0
    assert compare(synthetic(), synthetic(latency_ms=(20.0, within, 32.0, 40.0, 56.0))).ok
    result = compare(synthetic(), synthetic(latency_ms=(20.0, grown, 32.0, 40.0, 70.0 * 1.5)))
    assert [(r.kind, r.subject) for r in result.regressions] == [("latency_ratio", "T=4"), ("latency_ratio", "T=32")]
    assert "T=4/T=1" in result.regressions[0].message and "baseline 1.300" in result.regressions[0].message


def test_speedup_regression_beyond_tolerance_fails():
    limit = 60.0 * (1 - TOLERANCES.speedup)
    assert compare(synthetic(), synthetic(tokens_per_s={"ppd": limit * 1.02})).ok
    result = compare(synthetic(), synthetic(tokens_per_s={"ppd": limit * 0.97, "ht": 40.0}))
    assert [(r.kind, r.subject) for r in result.regressions] == [("speedup", "ppd"), ("speedup", "ht")]


def test_any_change_of_accepted_tokens_fails():
    """Greedy is deterministic: one step more over all prompts is a regression even when faster."""
    result = compare(synthetic(), synthetic(steps={"ppd": 151}, tokens_per_s={"ppd": 70.0}))
    assert [(r.kind, r.subject) for r in result.regressions] == [("accepted", "ppd")]
    assert "192/151" in result.regressions[0].message and "192/150" in result.regressions[0].message


def test_changed_inputs_fail_and_every_regression_is_listed_at_once():
    moved = {**INPUTS, "ppd": {**INPUTS["ppd"], "tree_sha256": "2"}}
    result = compare(synthetic(), synthetic(inputs=moved, steps={"ht": 100}, latency_ms=(20.0, 40.0, 32.0, 40.0, 56.0)))
    assert {r.kind for r in result.regressions} == {"inputs", "accepted", "latency_ratio"}
    assert "re-record the baseline" in result.regressions[0].message


def test_a_timing_regression_counts_only_when_it_repeats():
    slow_t4 = synthetic(latency_ms=(20.0, 40.0, 32.0, 40.0, 56.0))
    once = confirmed([compare(synthetic(), slow_t4), compare(synthetic(), synthetic())])
    assert once.ok
    twice = confirmed([compare(synthetic(), slow_t4), compare(synthetic(), slow_t4)])
    assert [r.subject for r in twice.regressions] == ["T=4"]
    changed = synthetic(latency_ms=(20.0, 40.0, 32.0, 40.0, 56.0), steps={"ppd": 1})
    flaky = confirmed([compare(synthetic(), synthetic(steps={"ppd": 1})), compare(synthetic(), changed)])
    assert [r.kind for r in flaky.regressions] == ["accepted"]        # deterministic ones always count
    assert any("not confirmed" in n for n in flaky.notes)


def test_baseline_round_trips(tmp_path):
    path = synthetic().save(tmp_path / "b.json")
    loaded = load_baseline(path)
    assert loaded.ratios == pytest.approx(synthetic().ratios) and loaded.bench["ppd"].steps == 150
    assert loaded.quiet == QUIET and loaded.config == LatencyTestConfig()
    data = json.loads(path.read_text())
    assert data["quiet"]["quiet"] is True and data["bench"]["ppd"]["mean_accepted"] == pytest.approx(1.28)


def test_missing_baseline_skips_with_the_command(tmp_path, capsys):
    outcome = run_latency_test("cpu", "onnxruntime", baseline=tmp_path / "none.json")
    assert outcome.ok and outcome.comparison is None
    assert "make latency-baseline GPU=cpu LATENCY_BACKEND=onnxruntime" in outcome.skipped
    assert runtime_main(["latency-test", "--gpu", "cpu", "--baseline", str(tmp_path / "none.json")]) == 0
    assert "latency test skipped: no latency baseline" in capsys.readouterr().out


def test_baseline_of_other_library_versions_skips(tmp_path):
    path = synthetic(versions={**here()[2], "onnxruntime": "0.0.1"}).save(tmp_path / "b.json")
    outcome = run_latency_test("cpu", "onnxruntime", baseline=path)
    assert outcome.comparison is None and "onnxruntime: baseline 0.0.1, here" in outcome.skipped


def test_the_test_measures_with_the_baselines_settings_and_retries_timing(tmp_path, monkeypatch, capsys):
    path = synthetic().save(tmp_path / "b.json")
    runs = iter([synthetic(latency_ms=(20.0, 40.0, 32.0, 40.0, 56.0)), synthetic()])
    seen = []

    def fake_measure(gpu, backend, device, model_dir, config, show_progress=True, log=print):
        seen.append(config)
        return next(runs)

    monkeypatch.setattr(lr, "measure", fake_measure)
    assert runtime_main(["latency-test", "--gpu", "cpu", "--baseline", str(path)]) == 0
    assert seen == [LatencyTestConfig()] * 2
    assert "PASS" in capsys.readouterr().out
    runs = iter([synthetic(steps={"ht": 3})])
    assert runtime_main(["latency-test", "--gpu", "cpu", "--baseline", str(path)]) == 1   # no retry for tokens
    assert "FAIL: 1 regression(s)" in capsys.readouterr().out


# --- quietness: recorded, and a busy machine's numbers are not kept -----------------------------------------

def test_busy_baseline_is_not_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 0.0)
    monkeypatch.setattr(lr, "measure", lambda *a, **k: synthetic(quiet=BUSY))
    out = tmp_path / "baseline.json"
    assert runtime_main(["latency-baseline", "--gpu", "cpu", "--out", str(out)]) == 2
    assert not out.exists() and "not writing the latency baseline: the machine was busy" in capsys.readouterr().err
    assert runtime_main(["latency-baseline", "--gpu", "cpu", "--out", str(out), "--force"]) == 0
    assert load_baseline(out).quiet.forced


def test_busy_machine_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 3.0)
    monkeypatch.setattr(lr, "measure", lambda *a, **k: pytest.fail("measured on a busy machine"))
    assert runtime_main(["latency-baseline", "--gpu", "cpu", "--out", str(tmp_path / "b.json")]) == 2
    assert "not measuring the latency baseline: the machine is busy" in capsys.readouterr().err


def test_trees_profile_records_quietness_and_refuses_busy(tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv = ["trees", "profile", "--gpu", "cpu", "--backend", "torch", "--model-dir", str(tiny_model_dir), "--method",
            "vanilla", "--max-tokens", "3", "--repeats", "2", "--rounds", "1", "--context", "8"]
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 0.0)
    real_rounds = tools.latency.profile.latency_rounds

    def timed(factor: float):   # the real measurement, its repeats replaced: `factor` apart
        def rounds(*args, **kwargs):
            medians, samples = real_rounds(*args, **kwargs)
            return medians, {t: [s[0], factor * s[0]] for t, s in samples.items()}
        return rounds

    monkeypatch.setattr(tools.latency.profile, "latency_rounds", timed(1.0))    # a quiet machine
    assert runtime_main([*argv, "--out", str(tmp_path / "quiet.json")]) == 0
    profile = load_profile(tmp_path / "quiet.json")
    assert profile.quiet is not None and profile.quiet.series == 3 and not profile.quiet.forced
    assert profile.quiet.spread == 0.0

    monkeypatch.setattr(tools.latency.profile, "latency_rounds", timed(3.0))    # a busy one
    assert runtime_main([*argv, "--out", str(tmp_path / "busy.json")]) == 2
    assert not (tmp_path / "busy.json").exists()
    assert "not writing the latency profile: the machine was busy" in capsys.readouterr().err
    assert runtime_main([*argv, "--out", str(tmp_path / "busy.json"), "--force"]) == 0
    assert load_profile(tmp_path / "busy.json").quiet.forced


# --- the real test: this machine against the committed CPU baseline -------------------------------------------

def test_cpu_latency_against_the_committed_baseline(real_model_dir, trained_ppd_checkpoint, trained_ht_checkpoint):
    """`make latency-test GPU=cpu`: ratios with tolerance, accepted tokens exactly; a timing regression
    is measured again and must repeat. Skipped, with the command, until a CPU baseline is committed."""
    outcome = run_latency_test("cpu", "onnxruntime", model_dir=real_model_dir, show_progress=False)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    comparison = outcome.comparison
    assert comparison.ok, "\n".join([r.message for r in comparison.regressions] + [comparison.table])
