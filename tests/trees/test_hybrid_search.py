"""Hybrid trees: the n-gram statistics, the expected gain of the n-gram part, the budget split."""

import pytest

from trees.hybrid_search import evaluate_hybrid, search_hybrid
from trees.ngram_stats import NgramStats, NgramStatsError, load_ngram_stats, save_ngram_stats
from trees._json import write_json
from trees.search import AcceptanceModel, SearchConfig, search


def ngram(match_rate: float, hist: tuple[int, ...], min_ngram: int = 1) -> NgramStats:
    proposals = sum(hist)
    return NgramStats(len(hist) - 1, round(proposals / match_rate), hist, "fp", min_ngram=min_ngram)


def test_ngram_statistics_and_their_file(tmp_path):
    stats = ngram(0.5, (20, 20, 20, 40))           # 100 proposals at 200 positions
    assert stats.match_rate == 0.5 and stats.at_least(0) == 1.0
    assert [stats.at_least(d) for d in (1, 2, 3, 4)] == [0.8, 0.6, 0.4, 0.0]
    shorter = ngram(0.7, (50, 20, 20, 10), min_ngram=2)
    save_ngram_stats(tmp_path / "ngram.json", [stats, shorter])
    assert load_ngram_stats(tmp_path / "ngram.json") == (stats, shorter)
    write_json(tmp_path / "one.json", stats.to_json())            # a file of one source reads as one
    assert load_ngram_stats(tmp_path / "one.json") == (stats,)
    with pytest.raises(NgramStatsError, match="distinct min_ngram"):
        save_ngram_stats(tmp_path / "twice.json", [stats, stats])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(NgramStatsError, match="not an n-gram statistics file"):
        load_ngram_stats(tmp_path / "bad.json")
    with pytest.raises(NgramStatsError, match="does not exist"):
        load_ngram_stats(tmp_path / "missing.json")
    with pytest.raises(NgramStatsError, match="non-negative counts"):
        NgramStats(2, 10, (1, 2), "fp")


def test_gain_when_ppd_never_guesses_right():
    """PPD never right: every n-gram depth reached adds its probability, b_d = match rate x at_least(d)."""
    model = AcceptanceModel.same_for_all_m([[0.0, 0.0], [0.0, 0.0]])
    trees, _ = search(model, lambda t: 1.0, budget=3)
    choice = evaluate_hybrid(trees, model, ngram(0.5, (20, 20, 20, 40)), lambda t: 1.0, depth=2, prompt_tokens=0)
    assert choice.mean_accepted == pytest.approx(1.0 + 0.5 * 0.8 + 0.5 * 0.6)
    assert choice.speedup == pytest.approx(choice.mean_accepted)   # flat latency


def test_useless_ngram_source_gets_no_budget_and_a_good_one_does():
    model = AcceptanceModel.same_for_all_m([[0.5, 0.2, 0.1], [0.4, 0.2, 0.1]])
    latency = lambda t: 1.0 + 0.05 * t  # noqa: E731
    config = SearchConfig(budgets=(12,))
    never = search_hybrid(model, [ngram(0.01, (1, 0, 0, 0, 0))], latency, 12, config)
    assert never.ngram_depth == 0
    plain, evaluation = search(model, latency, 12, config)
    assert never.tokens_per_second == pytest.approx(evaluation.tokens_per_second)
    strong = search_hybrid(model, [ngram(0.6, (5, 5, 10, 10, 70))], latency, 12, config)
    assert strong.ngram_depth >= 2 and strong.tokens_per_second > never.tokens_per_second
    assert strong.mean_accepted > strong.ppd.mean_accepted
    assert strong.ppd.budget + strong.ngram_depth * (1 + strong.ngram_prompt_tokens) <= 12


def test_the_search_picks_the_better_ngram_source():
    """Of the sources per min_ngram, the one whose proposals pay more is chosen and recorded."""
    model = AcceptanceModel.same_for_all_m([[0.5, 0.2, 0.1], [0.4, 0.2, 0.1]])
    latency = lambda t: 1.0 + 0.05 * t  # noqa: E731
    config = SearchConfig(budgets=(12,))
    often_wrong = ngram(0.9, (80, 10, 5, 3, 2), min_ngram=1)
    rarer_right = ngram(0.5, (5, 5, 10, 10, 70), min_ngram=2)
    for sources in ([often_wrong, rarer_right], [rarer_right, often_wrong]):
        choice = search_hybrid(model, sources, latency, 12, config)
        assert choice.min_ngram == 2 and choice.to_json()["min_ngram"] == 2
    alone = search_hybrid(model, [often_wrong], latency, 12, config)
    assert choice.tokens_per_second > alone.tokens_per_second
