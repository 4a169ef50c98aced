"""The batched-decoding benchmark on the tiny random Llama: every (method, B) measured, every request
identical to its smallest-batch and vanilla tokens (the methods are lossless, batching too), the
table and the flags' errors."""

from __future__ import annotations

import pytest

from tools.bench.batch import BatchBenchConfig, format_batch_table, run_batch_bench
from tools.commands import main


def test_every_method_and_batch_size_is_measured_and_lossless(tiny_model_dir):
    # vanilla named twice: an A/A control, run as a generator of its own
    report = run_batch_bench(BatchBenchConfig(methods=("vanilla", "ngram", "vanilla"), batch_sizes=(1, 3),
                                              max_new_tokens=8, repeats=2, model_dir=str(tiny_model_dir),
                                              backend="torch"))
    rows = {(r["method"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(m, b) for m in ("vanilla", "ngram", "vanilla#2") for b in (1, 3)}
    for (method, batch), row in rows.items():
        assert row["requests"] == 2 * batch and len(row["tokens_per_s_repeats"]) == 2 and row["tokens_per_s"] > 0
        assert row["identical_to_vanilla"] == row["requests"] and row["identical_to_smallest_batch"] == 2
        assert row["request_s_p50"] <= row["request_s_p90"] and row["deterministic"]
        paired = [mine / theirs for mine, theirs in zip(row["tokens_per_s_repeats"],
                                                       rows[("vanilla", batch)]["tokens_per_s_repeats"])]
        assert row["vs_vanilla_paired"] == pytest.approx(sum(paired) / 2)   # the median of two
    assert rows[("vanilla", 1)]["vs_vanilla_paired"] == 1.0
    assert rows[("vanilla", 3)]["tokens_per_step"] > rows[("vanilla", 1)]["tokens_per_step"]   # 3 sequences a step
    table = format_batch_table(report)
    assert table.splitlines()[0].split()[:7] == ["method", "B", "req", "tok/s", "x", "B=1", "x"]
    assert len(table.splitlines()) == 7


def test_bad_settings_are_refused(tiny_model_dir, capsys):
    with pytest.raises(ValueError, match="cannot fill a batch of 8"):
        BatchBenchConfig(batch_sizes=(1, 8), requests=4)
    with pytest.raises(ValueError, match=">= 1"):
        BatchBenchConfig(batch_sizes=(0,))
    assert main(["batch-bench", "--model", str(tiny_model_dir), "--batch-sizes", "1,x"]) != 0
    assert "--batch-sizes takes a comma list of integers" in capsys.readouterr().err
