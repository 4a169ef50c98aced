"""The benchmark harness: interleaved repeats, the report's comparisons against vanilla, its table."""

from __future__ import annotations

import json

import pytest

from tools.bench.harness import BenchConfig, run_bench, run_interleaved
from tools.bench.report import accepted_interval, decode_tokens_per_s_per_repeat, format_table, write_report
from tools.bench.runs import PromptRun


def test_repeats_interleave_runners_after_one_warm_up_each():
    """Each repeat runs every runner over all prompts before the next repeat starts, so a drift of the
    machine hits every method alike; the warm-up (a prefix of the first prompt) comes before any timing."""
    calls: list[tuple[str, int]] = []

    def runner(label: str):
        def run(ids: list[int]) -> PromptRun:
            calls.append((label, len(ids)))
            return PromptRun(ids[:2], 1, 0.1)
        return run

    encoded = [list(range(40)), list(range(5))]
    results, failures = run_interleaved({"a": runner("a"), "b": runner("b")}, encoded, repeats=2, show_progress=False)
    assert calls[:2] == [("a", 32), ("b", 32)]  # warm-ups
    assert calls[2:] == [("a", 40), ("a", 5), ("b", 40), ("b", 5)] * 2
    assert [len(reps) for reps in results.values()] == [2, 2]
    assert all(len(prompts) == 2 for reps in results.values() for prompts in reps)


def test_report_compares_every_method_with_vanilla_of_the_same_run(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Tell me about the sea."}\n'
                       '{"id": "b", "prompt": "def add(a, b):"}\n')
    report = run_bench(BenchConfig(prompts=str(prompts), methods=("vanilla", "ngram"), model_dir=str(tiny_model_dir),
                                   max_new_tokens=12, repeats=2), show_progress=False)
    vanilla, ngram = report["runs"]
    assert [vanilla["method"], ngram["method"]] == ["vanilla", "ngram"]
    assert vanilla["speedup_vs_vanilla"] == pytest.approx(1.0)
    assert ngram["speedup_vs_vanilla"] == pytest.approx(ngram["tokens_per_s"] / vanilla["tokens_per_s"])
    assert vanilla["matches_vanilla"] == ngram["matches_vanilla"] == 2  # lossless: same tokens on both prompts
    assert vanilla["mean_accepted"] == pytest.approx(1.0)  # one token per decode step
    assert ngram["mean_accepted_ci95"][0] <= ngram["mean_accepted"] <= ngram["mean_accepted_ci95"][1]
    assert ngram["mean_accepted"] >= 1.0
    assert all(r["deterministic"] and len(r["tokens_per_s_repeats"]) == 2 for r in report["runs"])
    for run in report["runs"]:   # the decode phase: after each prompt's first token, which the prefill made
        assert 0 < run["mean_first_token_s"] < max(p["seconds"] for p in run["prompts"])
        assert run["decode_tokens_per_s"] > 0 and len(run["decode_tokens_per_s_repeats"]) == 2
    assert ngram["decode_speedup_vs_vanilla"] == pytest.approx(ngram["decode_tokens_per_s"] / vanilla["decode_tokens_per_s"])
    table = format_table(report)
    assert "2/2" in table and table.count("\n") == 3

    out = tmp_path / "reports" / "bench.json"
    write_report(report, out)
    assert json.loads(out.read_text())["runs"][1]["method"] == "ngram"
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temp file left behind


def test_decode_rate_leaves_out_each_prompts_first_token_and_its_prefill():
    """Two engines with the same 0.5 s prefill and 10 ms per decoded token, one answering a prompt in 2
    tokens where the other writes 101: their whole-generation rates differ by 1.3x (the short answer is
    almost all prefill), their decode rates are both 100 tokens/s."""
    short = [PromptRun([1, 2], 2, 0.51, first_token_seconds=0.5), PromptRun([1] * 101, 101, 1.5, first_token_seconds=0.5)]
    long = [PromptRun([1] * 101, 101, 1.5, first_token_seconds=0.5)] * 2
    assert decode_tokens_per_s_per_repeat([short]) == pytest.approx([100.0])
    assert decode_tokens_per_s_per_repeat([long, long]) == pytest.approx([100.0, 100.0])
    whole = [sum(len(r.token_ids) for r in runs) / sum(r.seconds for r in runs) for runs in (short, long)]
    assert whole[1] / whole[0] > 1.3
    hidden = [PromptRun([1, 2], 2, 0.6)]   # a peer that does not time its prefill
    assert decode_tokens_per_s_per_repeat([short, hidden]) is None
    assert decode_tokens_per_s_per_repeat([[PromptRun([7], 1, 0.5, first_token_seconds=0.5)]]) == [0.0]


def test_accepted_interval_brackets_the_mean_and_narrows_with_agreeing_prompts():
    """A bootstrap over prompts: alike prompts give a point, mixed ones a wide interval around the mean."""
    low, high = accepted_interval([20, 20, 20], [10, 10, 10])
    assert low == high == 2.0
    tokens, steps = [10, 40, 10, 40] * 5, [10] * 20            # prompts accepting 1 and 4 tokens a step
    low, high = accepted_interval(tokens, steps)
    assert 1.5 < low < 2.5 < high < 3.5
    wider = accepted_interval(tokens[:4], steps[:4])
    assert wider[0] < low and wider[1] > high


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown method.*'medusa'.*choose from vanilla"):
        BenchConfig(methods=("vanilla", "medusa"))


def test_sampling_bench_uses_one_seed_for_every_method(tiny_model_dir, tmp_path):
    """Under sampling every method gets the run's seed (drawn once when none is given), so lossless
    methods still match vanilla token for token; the report and table say how it sampled."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "1 2 3 1 2 3 1 2 3"}\n')
    report = run_bench(BenchConfig(prompts=str(prompts), methods=("vanilla", "ngram"), model_dir=str(tiny_model_dir),
                                   max_new_tokens=16, repeats=1, temperature=0.1, top_p=0.9), show_progress=False)
    assert report["decoding"]["temperature"] == 0.1 and isinstance(report["decoding"]["seed"], int)
    assert [r["matches_vanilla"] for r in report["runs"]] == [1, 1]
    assert f"seed {report['decoding']['seed']}" in format_table(report)
    with pytest.raises(ValueError, match="greedy only"):
        BenchConfig(methods=("vanilla", "ortgenai"), temperature=0.7)
