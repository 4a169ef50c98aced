"""N-gram statistics collection: matched depths against the tokens that followed, end to end."""

from tools.treesearch.ngram_acceptance import NgramStatsConfig, collect_ngram_stats, count_matches, matched_depth
from runtime.proposers.hybrid import NgramSource


def test_matched_depth():
    assert matched_depth([4, 5, 6], [4, 5, 7, 8]) == 2
    assert matched_depth([4], [3]) == 0 and matched_depth([], [1]) == 0


def test_count_matches_on_a_repeating_sequence():
    # ... 1 2 3 9 1 2 3 ? : at the root 2 (index 5) the bigram "1 2" was seen, followed by 3 9 1
    sequence = [1, 2, 3, 9, 1, 2, 3, 9, 1, 2]
    steps, counts = count_matches(sequence, first=4, source=NgramSource(depth=2, prompt_tokens=0))
    # root index 4 (token 1): "9 1" seen before, then 2 3 -> both right; the step moves to index 7,
    # whose 2 future tokens are known: "3 9" seen, then 1 2 -> both right; index 10 is past the end
    assert steps == 2 and counts == [0, 0, 2]


def test_collect_on_the_tiny_model(tiny_model_dir):
    """One decode, replayed per min_ngram: a shorter shortest n-gram proposes at least as often."""
    config = NgramStatsConfig(model_dir=str(tiny_model_dir), num_prompts=2, max_new_tokens=16, max_depth=3)
    sources = collect_ngram_stats(config, ["1 2 3 1 2 3 1 2", "Hello there"], "test prompts", show_progress=False)
    assert [s.min_ngram for s in sources] == [1, 2, 3]
    for stats in sources:
        assert stats.num_prompts == 2 and 2 <= stats.positions <= 2 * (16 - 3)
        assert 0 <= stats.match_rate <= 1 and len(stats.depth_counts) == 4
    assert sources[0].proposals >= sources[2].proposals or sources[0].positions != sources[2].positions
