"""Tree search: hand-solved optima, exhaustive search on small cases, and the evaluation against a simulation."""

import itertools

import numpy as np
import pytest

from trees import PPDTreeSet
from trees.search import AcceptanceModel, SearchConfig, evaluate, replay, search, search_curve

# N=1, K=1: depth-1 top-1 right with p = 0.6. The tree for m=0 can only be the root with 1 prompt
# token (T=2). The tree for m=1 is one of (root count, [0] present, [0] count):
#   a: root c=0                 T=1, 1.0 token,  -> m=0
#   c: root c=0, [0] c=0        T=2, 1.6 tokens, -> m=0
#   e: root c=0, [0] c=1        T=3, 1.6 tokens, -> m=1 w.p. 0.6 (when [0] is accepted), else m=0
#   f: root c=1, [0] c=1        T=4, 1.6 tokens, -> m=1 always
# (and dominated ones). With L(T) = 1 + s (T - 1), tokens per second:
#   f: 1.6 / (1 + 3s)    e: 2 / (1.4 + 2.4s)    c: 1.3 / (1 + s)    a: 2 / (2 + s)
# f > e iff s < 1/9; e > c iff s < 0.18/1.12; c > a iff s < 6/7.
HAND = {"f": {(): 1, (0,): 1}, "e": {(): 0, (0,): 1}, "c": {(): 0, (0,): 0}, "a": {(): 0}}


def linear(slope):
    return lambda t: 1.0 + slope * (t - 1)


def nodes_of(trees: PPDTreeSet, m: int) -> dict:
    step = trees.trees[m]
    return dict(zip(((),) + step.tree.paths, step.prompt_counts))


@pytest.mark.parametrize("slope, best, rate", [
    (0.0, "f", 1.6),                    # flat latency: the biggest tree wins
    (0.05, "f", 1.6 / 1.15),
    (0.13, "e", 2 / (1.4 + 2.4 * 0.13)),
    (0.3, "c", 1.3 / 1.3),
    (2.0, "a", 2 / 4.0),                # steep latency: root-only trees
])
def test_hand_solved_two_level_case(slope, best, rate):
    model = AcceptanceModel.same_for_all_m([[0.6]])
    trees, evaluation = search(model, linear(slope), budget=8)
    assert nodes_of(trees, 1) == HAND[best]
    assert nodes_of(trees, 0) == {(): 1}
    assert evaluation.tokens_per_second == pytest.approx(rate)
    assert evaluation.speedup == pytest.approx(rate)  # L(1) = 1


def test_steep_latency_gives_root_only_trees_for_any_n():
    model = AcceptanceModel.same_for_all_m([[0.7, 0.2], [0.6, 0.2], [0.5, 0.2]])
    trees, evaluation = search(model, linear(5.0), budget=16)
    assert all(step.tree.size == 1 for step in trees.trees)
    assert evaluation.speedup < 1


def test_flat_latency_fills_the_budget_and_more_budget_gives_more_tokens():
    model = AcceptanceModel.same_for_all_m([[0.5, 0.2, 0.1], [0.4, 0.15, 0.1], [0.3, 0.1, 0.1]])
    result = search_curve(model, lambda t: 1.0, SearchConfig(budgets=(4, 8, 16, 32)))
    accepted = [e.mean_accepted for _, _, e in result.curve]
    assert accepted == sorted(accepted) and accepted[0] < accepted[-1]
    assert result.evaluation.budget > 32 - (1 + 3)   # at most one node with all prompt tokens left over
    assert result.evaluation.mean_accepted == pytest.approx(accepted[-1])


def test_latency_aware_choice_beats_every_fixed_budget():
    model = AcceptanceModel.same_for_all_m([[0.5, 0.12, 0.06], [0.32, 0.1, 0.06], [0.2, 0.08, 0.05]])
    latency = lambda t: float(np.interp(t, [1, 8, 16, 32, 64], [33, 38, 48, 80, 131]))  # noqa: E731
    result = search_curve(model, latency, SearchConfig(budgets=(4, 8, 16, 32, 64)))
    best_fixed = max(e.speedup for _, _, e in result.curve)
    assert result.evaluation.speedup >= best_fixed - 1e-12
    assert result.evaluation.speedup > 1


# --- exhaustive check on small cases ---------------------------------------------------------------

def all_trees(m, n, topk, budget, ensemble):
    nodes = [p for d in range(1, m + 1) for p in itertools.product(range(topk), repeat=d)]
    for r in range(len(nodes) + 1):
        for subset in itertools.combinations(nodes, r):
            if any(p[:-1] and p[:-1] not in subset for p in subset):
                continue
            paths = [()] + list(subset)
            for counts in itertools.product(range(n + 1), repeat=len(paths)):
                if (m == 0 and counts[0] == 0) or len(paths) + ensemble * sum(counts) > budget:
                    continue
                yield dict(zip(paths, counts))


def to_tree_set(choice, n, topk):
    return PPDTreeSet.from_json({"num_prompt_tokens": n, "topk": topk, "trees": {
        str(m): [{"path": list(p), "prompt_tokens": c} for p, c in nodes.items()] for m, nodes in enumerate(choice)}})


@pytest.mark.parametrize("seed, ensemble", [(0, 1), (1, 1), (2, 2)])
def test_search_matches_exhaustive_search(seed, ensemble):
    rng = np.random.default_rng(seed)
    n, topk, budget = 2, 2, 5 + 2 * (ensemble - 1)
    p = rng.dirichlet(np.ones(topk + 1), size=(n + 1, n))[:, :, :topk]  # differs per m
    model = AcceptanceModel(p, ensemble)
    latency = linear(rng.uniform(0.05, 0.25))
    # Evaluate every combination of per-m trees through the public evaluation.
    options = [list(all_trees(m, n, topk, budget, ensemble)) for m in range(n + 1)]
    best = max(evaluate(to_tree_set(choice, n, topk), model, latency).tokens_per_second
               for choice in itertools.product(*options))
    _, evaluation = search(model, latency, budget, SearchConfig(topk=topk))
    assert evaluation.tokens_per_second == pytest.approx(best, rel=1e-9)


# --- the evaluation is what decoding would see ---------------------------------------------------

def test_evaluation_matches_a_simulated_decode():
    """Sample each depth's true rank from the model, walk the tree like verify does, follow the
    accepted node's prompt tokens to the next tree: mean tokens per step must match the prediction."""
    per_depth = np.array([[0.5, 0.2, 0.1], [0.4, 0.15, 0.05], [0.3, 0.1, 0.05]])
    model = AcceptanceModel.same_for_all_m(per_depth)
    trees = PPDTreeSet.from_json({"num_prompt_tokens": 3, "topk": 3, "trees": {
        "3": [{"path": [], "prompt_tokens": 3}, {"path": [0], "prompt_tokens": 3}, {"path": [1], "prompt_tokens": 1},
              {"path": [0, 0], "prompt_tokens": 2}, {"path": [0, 0, 0], "prompt_tokens": 0}],
        "2": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 3},
              {"path": [0, 1], "prompt_tokens": 1}],
        "1": [{"path": [], "prompt_tokens": 3}, {"path": [0], "prompt_tokens": 2}, {"path": [2], "prompt_tokens": 3}],
        "0": [{"path": [], "prompt_tokens": 3}]}})
    predicted = evaluate(trees, model, lambda t: 1.0)
    rng = np.random.default_rng(0)
    m, tokens, steps = 3, 0, 40000
    miss = 1 - per_depth.sum(1)
    for _ in range(steps):
        nodes = nodes_of(trees, m)
        path = ()
        while len(path) < m:
            rank = rng.choice(4, p=np.append(per_depth[len(path)], miss[len(path)]))
            if path + (rank,) not in nodes:
                break
            path += (rank,)
        tokens += len(path) + 1
        m = nodes[path]
    assert tokens / steps == pytest.approx(predicted.mean_accepted, rel=0.02)


def test_replay_walks_each_record_down_the_tree():
    trees = PPDTreeSet.from_json({"num_prompt_tokens": 2, "topk": 2, "trees": {
        "2": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}, {"path": [0, 1], "prompt_tokens": 2}],
        "1": [{"path": [], "prompt_tokens": 2}, {"path": [1], "prompt_tokens": 2}],
        "0": [{"path": [], "prompt_tokens": 2}]}})
    records = [(2, 0, 1), (2, 0, 0), (2, 1, 5), (2, 5, 1), (2, 0)]  # the last one is too short for m=2
    # m=2: [0,1] -> 3 tokens, [0] -> 2, root -> 1, root -> 1; m=1 (first rank only, all 5 records): [1] once
    assert replay(trees, records) == (1.0, pytest.approx(6 / 5), pytest.approx(7 / 4))


def test_model_from_stats_is_non_increasing_in_rank():
    from trees.stats import AcceptanceStats

    # rank 1 seen once more than rank 0 at depth 1: noise; the model pools them
    steps = [(1, 0)] * 3 + [(1, 1)] * 4 + [(1, 2)] * 1 + [(1, 3)] * 2
    stats = AcceptanceStats(1, 1, 3, tuple(steps), "m", "c")
    model = AcceptanceModel.from_stats(stats, shrinkage=0)
    assert model.p[1, 0].tolist() == pytest.approx([0.35, 0.35, 0.1])
    assert model.p[1, 0].sum() == pytest.approx(0.8)
