"""trees/quiet.py: how quiet the machine was, recorded with a latency profile (optional, so the committed
profiles from before the field still load), and the refusal to keep a busy machine's numbers."""

from __future__ import annotations

import dataclasses

import pytest

import trees.quiet
from trees.latency import LatencyProfile, load_profile
from trees.quiet import BusyMachineError, Quietness, refuse_busy_start

QUIET = Quietness(0.05, 0.1, 2, 0.06, 0.12, 8)
BUSY = Quietness(0.05, 0.7, 2, 0.45, 0.9, 8)


def test_busy_spread_or_load_is_refused_unless_forced():
    assert QUIET.quiet and QUIET.refuse_if_busy("x", False, "cmd") is QUIET
    with pytest.raises(BusyMachineError, match=r"repeats spread 45\.0%.*add --force"):
        BUSY.refuse_if_busy("the latency baseline", False, "make latency-baseline GPU=cpu")
    forced = BUSY.refuse_if_busy("the latency baseline", True, "cmd")
    assert forced.forced and "kept with --force" in forced.summary()
    loaded = dataclasses.replace(QUIET, load_before=1.2)
    assert not loaded.quiet and "other processes were running" in loaded.busy_reasons[0]


def test_quietness_measures_spread_and_load(monkeypatch):
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 0.4)
    q = Quietness.measure(0.1, [[1.0] * 9 + [1.0], [1.0, 1.1, 1.2, 0.9, 1.0]])
    assert (q.load_before, q.load_after, q.series) == (0.1, 0.4, 2) and q.worst_spread == pytest.approx(0.22, abs=0.01)
    assert trees.quiet.relative_spread([5.0]) == 0.0


def test_committed_profiles_without_quietness_still_load():
    from pathlib import Path

    checkpoints = Path(__file__).resolve().parents[2] / "checkpoints"   # trees/ tests import nothing else of ours
    paths = sorted(checkpoints.glob("*/latency-*.json"))
    assert paths
    for path in paths:
        profile = load_profile(path)
        assert profile.quiet is None or isinstance(profile.quiet, Quietness)


def test_busy_start_is_refused_before_measuring(monkeypatch):
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 0.2)
    refuse_busy_start("x", False, "cmd")
    monkeypatch.setattr(trees.quiet, "load_per_core", lambda: 2.0)
    with pytest.raises(BusyMachineError, match="not measuring the profile: the machine is busy"):
        refuse_busy_start("the profile", False, "cmd")
    refuse_busy_start("the profile", True, "cmd")


def test_profile_round_trips_its_quietness(tmp_path):
    profile = LatencyProfile("cpu", "cpu: X", "torch", (1, 2), (0.01, 0.012), 10, 300, "abc", quiet=QUIET)
    loaded = load_profile(profile.save(tmp_path / "p.json"))
    assert loaded.quiet == QUIET and loaded == profile
    assert load_profile(dataclasses.replace(profile, quiet=None).save(tmp_path / "old.json")).quiet is None


def test_busy_share_sees_a_spinning_process():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from trees.quiet import load_per_core

    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat: the load average is used instead")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = load_per_core()
    finally:
        spinner.kill()
        spinner.wait()
    # one core of os.cpu_count() spun for the whole one-second sample
    assert 0.8 / (os.cpu_count() or 1) <= busy <= 1.0
