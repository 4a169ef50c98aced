"""Bench runs as `method@variant` labels: parsing, validation, and which vanilla each run is compared with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tools.bench import harness as bench
from tools.bench.harness import BenchConfig, run_bench
from tools.bench.report import format_table
from tools.bench.runs import PromptRun
from tools.bench.labels import RunLabel, parse_label, parse_labels, speed_baseline, token_baseline


@pytest.mark.parametrize("label, method, variant", [
    ("vanilla", "vanilla", "fp32"),           # our default variant
    ("ppd@int8", "ppd", "int8"),
    ("ngram@int4", "ngram", "int4"),
    ("llamacpp", "llamacpp", "f32"),          # llama.cpp's type at fp32
    ("llamacpp@q8_0", "llamacpp", "q8_0"),
    ("hf-generate", "hf-generate", "fp32"),   # peers without variants run their fp32 model
])
def test_labels_parse_with_the_default_variant_filled_in(label, method, variant):
    assert parse_label(label) == RunLabel(label, method, variant)


@pytest.mark.parametrize("label, message", [
    ("ppd@q8_0", r"bench run 'ppd@q8_0': ppd has no variant 'q8_0'; choose one of fp32, int8, int4"),
    ("llamacpp@int8", r"bench run 'llamacpp@int8': llamacpp has no variant 'int8'; choose one of f32, q8_0, q4_1"),
    ("vanilla@", r"vanilla has no variant ''"),
    ("medusa@int8", r"unknown method 'medusa' in bench run 'medusa@int8'; choose from vanilla.*llamacpp takes @f32"),
    ("ortgenai@int8", r"bench run 'ortgenai@int8': the ortgenai peer has no variants"),
])
def test_bad_labels_are_refused_naming_the_label_and_the_choices(label, message):
    with pytest.raises(ValueError, match=message):
        parse_label(label)


def test_the_same_run_listed_twice_is_refused():
    with pytest.raises(ValueError, match=r"'vanilla' and 'vanilla@fp32' are the same run"):
        parse_labels(["vanilla", "vanilla@fp32"])
    with pytest.raises(ValueError, match="no bench runs listed"):
        parse_labels([])


def test_config_refuses_what_cannot_run_before_loading_anything():
    with pytest.raises(ValueError, match=r"'ppd@int8': the int8 variant is an onnxruntime engine; use --backend onnxruntime"):
        BenchConfig(methods=("vanilla", "ppd@int8"), backend="torch")
    with pytest.raises(ValueError, match=r"llamacpp peer runs greedy only: drop 'llamacpp@q8_0'"):
        BenchConfig(methods=("vanilla", "llamacpp@q8_0"), backend="onnxruntime", temperature=0.7)
    with pytest.raises(ValueError, match=r"'llamacpp': the llama.cpp peer is built for the CPU only"):
        BenchConfig(methods=("llamacpp",), device="cuda")


def test_speed_is_against_the_first_vanilla_and_tokens_against_the_same_precision():
    runs = parse_labels(["ppd@int8", "vanilla@fp32", "vanilla@int8", "llamacpp@q8_0", "llamacpp@q4_1", "ngram@int4"])
    first_vanilla = runs[1]
    assert speed_baseline(runs) == first_vanilla
    by_label = {r.label: r for r in runs}
    assert token_baseline(by_label["ppd@int8"], runs).label == "vanilla@int8"
    assert token_baseline(by_label["llamacpp@q8_0"], runs).label == "vanilla@int8"   # q8_0 stands next to int8
    assert token_baseline(by_label["llamacpp@q4_1"], runs) == first_vanilla          # no vanilla@int4 ran
    assert token_baseline(by_label["ngram@int4"], runs) == first_vanilla
    assert speed_baseline(parse_labels(["ppd", "llamacpp"])) is None


def test_report_keeps_labels_and_compares_with_fake_runners(tmp_path, monkeypatch):
    """Fake runners: vanilla@int8 and ppd@int8 agree with each other but not with vanilla@fp32; llamacpp@q8_0
    agrees with vanilla@int8 on one prompt of two. Speedups divide by the first vanilla's tokens/s."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n')
    fp32_tokens = {1: [5, 6, 7, 8], 2: [9, 9]}
    int8_tokens = {1: [5, 6, 0, 0], 2: [9, 9]}
    peer_tokens = {1: [5, 6, 0, 0], 2: [9, 1]}

    def fake(tokens: dict[int, list[int]], seconds_per_token: float):
        def run(ids: list[int]) -> PromptRun:
            new = tokens.get(ids[0], [1])   # the warm-up prefix is ids[:32] of prompt 1
            return PromptRun(new, len(new), seconds_per_token * len(new))
        return run

    class FakeGenerator:
        tokenizer = SimpleNamespace(chat_template=None)   # a base model: prompts go in as raw text

        def encode(self, prompt: str) -> list[int]:
            return [1] if prompt == "one" else [2]

    runners = {"vanilla@fp32": fake(fp32_tokens, 0.04), "ppd@int8": fake(int8_tokens, 0.01),
               "vanilla@int8": fake(int8_tokens, 0.02), "llamacpp@q8_0": fake(peer_tokens, 0.05)}
    monkeypatch.setattr(bench, "make_runners", lambda cfg, decoding: (runners, FakeGenerator()))
    report = run_bench(BenchConfig(prompts=str(prompts), methods=tuple(runners), backend="onnxruntime", repeats=1),
                       show_progress=False)
    assert report["prompt_format"] == "raw text (no chat template)"
    runs = {r["label"]: r for r in report["runs"]}
    assert list(runs) == list(runners)
    assert (runs["ppd@int8"]["method"], runs["ppd@int8"]["variant"]) == ("ppd", "int8")
    assert runs["vanilla@int8"]["speedup_vs_vanilla"] == pytest.approx(2.0)
    assert runs["ppd@int8"]["speedup_vs_vanilla"] == pytest.approx(4.0)
    assert runs["llamacpp@q8_0"]["speedup_vs_vanilla"] == pytest.approx(0.8)
    assert [(r["matches_vanilla_of"], r["matches_vanilla"]) for r in runs.values()] == [
        ("vanilla@fp32", 2), ("vanilla@int8", 2), ("vanilla@int8", 2), ("vanilla@int8", 1)]
    table = format_table(report)
    assert "speedup vs vanilla@fp32" in table
    assert any(line.startswith("llamacpp@q8_0") and line.endswith("vanilla@int8 1/2") for line in table.splitlines())


def test_table_reads_reports_written_before_labels():
    """gpu_check formats report files of earlier runs, which have `method` only."""
    old = {"prompts": "mtbench", "max_new_tokens": 8, "backend": "torch", "device": "cpu", "repeats": 1,
           "runs": [{"method": "vanilla", "tokens_per_s": 10.0, "mean_accepted": 1.0, "speedup_vs_vanilla": 1.0,
                     "matches_vanilla": 1, "prompts": [{}]}]}
    assert format_table(old).splitlines()[-1].split() == ["vanilla", "10.0", "1.00", "1.00x", "-", "-", "-", "vanilla", "1/1"]
