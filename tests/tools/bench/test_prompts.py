"""Prompt specs (tools/bench/prompts.py): packaged sets, JSONL files, slices and interleaved mixes."""

from __future__ import annotations

import json

import pytest

from tools.bench.prompts import load_prompts


def test_a_slice_holds_exactly_the_prompts_a_limited_bench_never_runs() -> None:
    full = load_prompts("humaneval")
    bench = load_prompts("humaneval", limit=20)
    held_out = load_prompts("humaneval[20:]")
    assert held_out == full[20:]
    assert not {item.id for item in bench} & {item.id for item in held_out}
    assert load_prompts("mtbench[-3:]") == load_prompts("mtbench")[-3:]


def test_a_stepped_slice_spreads_over_mt_benchs_categories():
    """MT-Bench holds 8 categories of 10 questions in order: its first 20 are writing and roleplay only,
    every 4th question is 20 from all 8 (the bench's set), and every 4th from the third is disjoint from it."""
    spread, held_out = load_prompts("mtbench[::4]"), load_prompts("mtbench[2::4]")
    assert len(spread) == len(held_out) == 20
    assert {(int(item.id.split("-")[1]) - 81) // 10 for item in spread} == set(range(8))   # ids 81..160
    assert not {item.id for item in spread} & {item.id for item in held_out}


def test_a_mix_interleaves_its_parts_and_keeps_the_longer_tail() -> None:
    chat, code = load_prompts("mtbench[70:]"), load_prompts("humaneval[150:]")   # 10 and 14 prompts
    mix = load_prompts("mtbench[70:]+humaneval[150:]")
    assert mix[:4] == [chat[0], code[0], chat[1], code[1]]
    assert len(mix) == len(chat) + len(code)
    assert mix[-4:] == code[-4:]
    assert load_prompts("mtbench[70:]+humaneval[150:]", limit=6) == mix[:6]


def test_jsonl_files_slice_and_mix_like_the_packaged_sets(tmp_path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i}"}) + "\n" for i in range(5)))
    assert [item.id for item in load_prompts(str(path))] == ["p0", "p1", "p2", "p3", "p4"]
    assert [item.id for item in load_prompts(f"{path}[3:]+mtbench[:1]")] == ["p3", "mtbench-81", "p4"]


def test_bad_specs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"'mtbench\[100:\]' select nothing: mtbench holds 80 prompts"):
        load_prompts("mtbench[100:]")
    with pytest.raises(ValueError, match=r"'mtbench\[::0\]': a slice step must be at least 1"):
        load_prompts("mtbench[::0]")
    with pytest.raises(FileNotFoundError, match=r"mtbenc is neither .* \(slice a set as humaneval\[20:\]"):
        load_prompts("mtbenc[1:]")
