"""Peers in processes of their own: a crash inside a peer's native code ends that peer's runs, reported
as its failure, and the bench's other runs complete (tools/peers/process.py, tools/bench/harness.py)."""

from __future__ import annotations

import os

import pytest

from tests.tools.peers import stand_in_peers
from tools.bench import harness
from tools.bench.harness import BenchConfig, run_bench, run_interleaved
from tools.bench.report import format_table
from tools.bench.runs import PeerFailed, PromptRun
from tools.peers.process import PeerProcess, describe_exit


def test_a_peer_runs_in_its_own_process_and_answers_calls():
    with PeerProcess("echo", stand_in_peers.echo) as peer:
        assert peer.call("pid") != os.getpid()
        assert peer([5, 6, 7, 8]) == PromptRun([5, 6, 7], 3, 0.01)
        with pytest.raises(ValueError, match="refused this"):   # an ordinary error is the caller's, as raised
            peer.call("refuse", "this")
        assert peer([1, 2, 3]).token_ids == [1, 2, 3]             # and the peer lives on


def test_a_peer_that_segfaults_fails_with_the_signal_and_stays_failed():
    peer = PeerProcess("crashy", stand_in_peers.echo, {"crash_on_call": 2})
    assert peer([1, 2, 3]).token_ids == [1, 2, 3]
    with pytest.raises(PeerFailed, match="crashy peer's process killed by SIGSEGV during __call__"):
        peer([1, 2, 3])
    with pytest.raises(PeerFailed, match="SIGSEGV"):
        peer([1, 2, 3])
    peer.close()


def test_a_peer_that_dies_or_fails_while_loading():
    with pytest.raises(PeerFailed, match="killed by SIGSEGV loading"):
        PeerProcess("dead", stand_in_peers.crash_while_loading)
    with pytest.raises(FileNotFoundError, match="make peers"):   # a load error keeps its type and message
        PeerProcess("missing", stand_in_peers.fail_while_loading)


def test_describe_exit():
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "still running"


def test_the_interleaved_run_goes_on_without_a_peer_that_crashed():
    calls = []

    def ours(ids: list[int]) -> PromptRun:
        calls.append(len(ids))
        return PromptRun(ids[:2], 1, 0.1)

    peer = PeerProcess("crashy", stand_in_peers.echo, {"crash_on_call": 3})   # warm-up, prompt 1, then dies
    encoded = [list(range(40)), list(range(5)), list(range(7))]
    try:
        results, failures = run_interleaved({"ours": ours, "crashy": peer}, encoded, repeats=2, show_progress=False)
    finally:
        peer.close()
    assert list(results) == ["ours"] and [len(r) for r in results["ours"]] == [3, 3]
    assert list(failures) == ["crashy"] and "SIGSEGV" in failures["crashy"]
    assert len(calls) == 1 + 6


def test_the_bench_reports_a_crashed_peer_and_completes_the_other_runs(tiny_model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Tell me about the sea."}\n{"id": "b", "prompt": "def add(a, b):"}\n')
    monkeypatch.setattr(harness, "start_peer", lambda cfg, run, eos, decoding: PeerProcess(
        run.label, stand_in_peers.echo, {"crash_on_call": 2}))
    report = run_bench(BenchConfig(prompts=str(prompts), methods=("vanilla", "ngram", "hf-generate"),
                                   model_dir=str(tiny_model_dir), max_new_tokens=8, repeats=1), show_progress=False)
    vanilla, ngram, peer = report["runs"]
    assert vanilla["matches_vanilla"] == ngram["matches_vanilla"] == 2
    assert peer["failed"].startswith("the hf-generate peer's process killed by SIGSEGV")
    assert peer["tokens_per_s"] is None and peer["speedup_vs_vanilla"] is None
    assert "hf-generate         failed: the hf-generate peer's process killed by SIGSEGV" in format_table(report)
