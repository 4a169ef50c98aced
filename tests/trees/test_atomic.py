"""trees/atomic.py: whole files or nothing, the old file kept on failure, no temp files left behind."""

import stat

import pytest

from trees.atomic import atomic_path, write_atomic


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_writes_text_and_bytes_with_the_mode(tmp_path):
    path = tmp_path / "new" / "dir" / "a.json"   # parents created
    assert write_atomic(path, "héllo\n") == path
    assert path.read_text(encoding="utf-8") == "héllo\n" and mode_of(path) == 0o644
    write_atomic(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01" and mode_of(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_write_atomic_refuses_other_data_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError, match="bytes or str"):
        write_atomic(path, {"not": "bytes"})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_renames_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path, suffix=".npz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".npz") and tmp != path
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.npz"]
    with atomic_path(path, suffix=".npz") as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and mode_of(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["data.npz"]


def test_atomic_path_without_a_previous_file_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"
    with pytest.raises(KeyboardInterrupt):  # BaseException too: an interrupted write leaves no temp
        with atomic_path(path):
            raise KeyboardInterrupt
    assert not path.exists() and list(path.parent.iterdir()) == []
