"""Peak-RSS measurement of a child process (tools/bench/memory.py)."""

import pytest

from tools.bench.memory import MemoryRow, format_memory, peak_rss_of


def test_peak_rss_is_the_childs_own_high_water_mark(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "idle.py").write_text("pass\n")
    (tmp_path / "hungry.py").write_text("b = bytearray(300 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n")
    small, big = peak_rss_of("idle", []), peak_rss_of("hungry", [])
    assert small < 100                # a bare interpreter, not the size of this pytest process
    assert big - small > 250          # the 300 MiB the child touched


def test_failing_child_is_an_error_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "broken.py").write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="boom"):
        peak_rss_of("broken", [])


def test_table_shows_ratio_to_vanilla():
    text = format_memory([MemoryRow("vanilla", 1000.0, 1.0), MemoryRow("ppd", 1010.0, 1.01)])
    assert "1.010x" in text and "1010.0" in text
