"""Trees per batch size (tools/treesearch/batch.py, trees/ppd_tree.py batch_tree_sets): smaller trees as B
grows where the step's cost grows with its tokens, vanilla (null) where no tree pays; the measured
batched steps used when the profile has them; the proposers take the set of the step's B, and a batch
decoded with them still gives every request its solo tokens."""

from __future__ import annotations

import json

import pytest

from runtime import BatchGenerator, Generator
from runtime.backends.base import CacheOwner
from tools.treesearch.batch import batch_latency, search_batches
from trees import PPDTreeSet, batch_tree_sets, for_batch
from trees.latency import LatencyProfile
from trees.search import AcceptanceModel, SearchConfig, search
from tests.runtime.test_ppd import tiny_ppd  # noqa: F401 (fixture)

MODEL = AcceptanceModel.same_for_all_m([[0.6, 0.2, 0.1], [0.5, 0.15, 0.1], [0.4, 0.1, 0.1]])
CONFIG = SearchConfig(budgets=(4, 8, 16, 32, 64))


def profile(fixed_ms: float, per_token_ms: float, batch=()) -> LatencyProfile:
    sizes = tuple(range(1, 65))
    return LatencyProfile("cpu", "cpu: test", "torch", sizes, tuple(1e-3 * (fixed_ms + per_token_ms * t) for t in sizes),
                          10, 300, "abc", batch=batch)


def test_trees_shrink_as_batches_grow_and_vanilla_where_no_tree_pays():
    # A step costs a fixed 4 ms plus 0.1 ms a token: at B = 16 a tree of 4 tokens costs 2.1x vanilla's step.
    record = search_batches(MODEL, profile(4.0, 0.1), CONFIG)
    assert list(record) == ["2", "4", "8", "16"]
    budgets = [record[b]["budget"] for b in record if record[b]["trees"]]
    assert len(budgets) >= 2 and budgets == sorted(budgets, reverse=True) and budgets[0] <= 32
    assert all(e["latency"] == "total tokens" and e["expected_speedup"] >= CONFIG.min_batch_speedup
               for e in record.values() if e["trees"])
    one, _ = search(MODEL, profile(4.0, 0.1).latency, 64, CONFIG)
    assert record["2"]["budget"] <= one.max_tokens(MODEL.ensemble)
    steep = search_batches(MODEL, profile(0.0, 1.0), CONFIG)   # cost in proportion to tokens: no tree pays
    assert all(e["trees"] is None and e["budget"] == 1 and e["best_tree_speedup"] < 1 for e in steep.values())


def test_a_tree_predicted_faster_by_less_than_the_margin_is_not_taken():
    record = search_batches(MODEL, profile(4.0, 0.1), SearchConfig(budgets=CONFIG.budgets, min_batch_speedup=1.0))
    won = {b: e["best_tree_speedup"] for b, e in record.items() if e["trees"] is not None}
    assert won, "the profile must leave some B a tree predicted faster than vanilla"
    b, speedup = min(won.items(), key=lambda item: item[1])
    above = search_batches(MODEL, profile(4.0, 0.1), SearchConfig(budgets=CONFIG.budgets,
                                                                    min_batch_speedup=speedup + 1e-3))
    assert above[b]["trees"] is None and above[b]["budget"] == 1 and above[b]["best_tree_speedup"] == record[b][
        "best_tree_speedup"]
    assert all(above[k]["trees"] is not None for k, v in won.items() if v > speedup + 1e-3)
    with pytest.raises(ValueError, match="min_batch_speedup"):
        SearchConfig(min_batch_speedup=0.9)


def test_measured_batched_steps_are_used_where_the_profile_has_them():
    flat = profile(2.0, 0.01, batch=((4, tuple(1e-3 * (8.0 + 0.01 * t) for t in range(1, 17))),))
    latency, reach, source = batch_latency(flat, 4)
    assert (reach, source) == (16, "measured") and latency(1) == pytest.approx(8.01e-3)
    assert batch_latency(flat, 8)[1:] == (8, "total tokens")
    assert search_batches(MODEL, flat, CONFIG)["4"]["latency"] == "measured"


def test_a_tree_file_with_a_batch_record_round_trips_and_picks_by_batch_size():
    trees, _ = search(MODEL, profile(2.0, 0.01).latency, 16, CONFIG)
    record = search_batches(MODEL, profile(4.0, 0.1), CONFIG)
    loaded = PPDTreeSet.from_json(json.loads(json.dumps({**trees.to_json(), "batch": record})))
    sets = batch_tree_sets(loaded)
    assert list(sets) == [1, 2, 4, 8, 16] and sets[1] is loaded and all(sets[b] is not None for b in (2, 4, 8))
    # rounded up: a tree set never serves more sequences per step than it was searched for
    assert for_batch(sets, 3) is sets[4] and for_batch(sets, 5) is sets[8] and for_batch(sets, 2) is sets[2]
    assert for_batch(sets, 100) is sets[16] and for_batch(sets, 1) is loaded


def test_a_batch_takes_the_trees_of_its_size_and_stays_lossless(tiny_model_dir, tiny_ppd, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    """B = 1 the fixture's trees; from B = 2 on null (vanilla steps): a lone request decodes trees, three
    together decode single tokens, and every request still gets its solo tokens."""
    checkpoint, tree = tiny_ppd
    data = json.loads(tree.read_text())
    data["batch"] = {"2": {"trees": None, "budget": 1, "expected_speedup": 1.0}}
    batched_tree = tmp_path / "tree-batch.json"
    batched_tree.write_text(json.dumps(data))
    options = {"checkpoint": str(checkpoint), "tree": str(batched_tree)}
    prompts = ["Hello there", "Write a poem about the sea", "1 2 3 4 1 2 3 4"]
    solo = Generator.from_pretrained(tiny_model_dir, method="ppd", **options)
    want = [solo.generate(p, max_new_tokens=16).token_ids for p in prompts]
    sizes = []
    step_batch = CacheOwner.step_batch

    def record_sizes(self, drafts):
        sizes.append(tuple(d.size for _, d in drafts))
        return step_batch(self, drafts)
    monkeypatch.setattr(CacheOwner, "step_batch", record_sizes)
    with BatchGenerator.from_pretrained(tiny_model_dir, methods=("ppd",), max_batch=3, **options) as batch:
        requests = [batch.submit(p, max_new_tokens=16) for p in prompts]
        batch.run()
        assert [r.result.token_ids for r in requests] == want
        three = [s for s in sizes if len(s) == 3]
        assert three and all(s == (1, 1, 1) for s in three[1:])   # after the prefills: vanilla steps
        sizes.clear()
        alone = batch.submit(prompts[0], max_new_tokens=16)
        batch.run()
        proposer = batch.methods["ppd"].proposer
    assert alone.result.token_ids == want[0]
    # a prefill attaches the prompt tokens only where a tree will read their guesses
    n, k = proposer.config.num_prompt_tokens, proposer.config.ensemble
    assert proposer.prefill_draft([5, 6, 7], 1).size == 3 + n * k and proposer.prefill_draft([5, 6, 7], 3).size == 3
    assert max(s[0] for s in sizes[1:]) > 1   # one sequence: the B = 1 trees again
