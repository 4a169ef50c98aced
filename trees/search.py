"""Hardware-aware PPD tree search: the per-m trees that maximise accepted tokens per second.

The model (PPD's, made exact for any N):

- A step in state m (m prompt predictions available) uses tree G_m: candidate nodes up to depth m,
  node v = rank path (r_1..r_d), accepted with probability a(v) = prod_i p_m(i, r_i) (see
  trees.stats; a(root) = 1). The step yields R_m = sum_v a(v) tokens: the accepted depth plus the
  bonus token.
- The accepted path ends at node v with probability P(last = v) = a(v) - sum_{children w} a(w);
  the next state is the number of prompt tokens c_v that v carries. So G_m fixes a distribution of
  the next m: a Markov chain over m = 0..N, started at N (the prefill attaches N prompt tokens).
- G_m costs T_m = |G_m| + k * sum_v c_v tokens, i.e. L(T_m) seconds from the latency profile.

Tokens per second = sum_m pi_m R_m / sum_m pi_m L(T_m) under the chain's long-run distribution pi:
an average-reward semi-Markov decision problem whose actions are trees. It is solved by policy
iteration: evaluate the current trees (rate rho, relative values h(m) of being in state m), then
for each m pick the tree maximising

    sum_v a(v)  +  sum_v P(last = v) h(c_v)  -  rho L(T)

which is PPD's prompt-token allocation made precise: a node's prompt tokens are worth the
probability that it is the last accepted node times the value of the predictions they carry. That
maximisation is an exact tree knapsack over the candidate paths of highest a(v): for every node and
every count c, its children's best sub-trees are merged by max-plus convolution over the token
budget; the budget with the best value net of rho L(T) wins. Iteration stops when no tree changes.

`search_curve` also finds, for each fixed budget B, the trees with the most tokens per step within
T <= B (latency ignored, PPD's "best tree of each size") and evaluates them on the measured
latency: the curve of expected accepted tokens and speedup against tree size.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from trees.latency import monotone_fit
from trees.ppd_tree import PPDStepTree, PPDTreeSet
from trees.stats import DEFAULT_SHRINKAGE, AcceptanceStats
from trees.tree import Tree, TreeError

DEFAULT_BUDGETS = (4, 6, 8, 12, 16, 24, 32, 48, 64)
LatencyFn = Callable[[int], float]
Path = tuple[int, ...]
_NEG = -np.inf


@dataclass(frozen=True)
class AcceptanceModel:
    """p[m, d-1, r]: probability that rank r at depth d is right given depths above were, in state m."""

    p: np.ndarray          # [N+1, N, K]
    ensemble: int = 1      # k: tokens per prompt token carried

    def __post_init__(self) -> None:
        p = np.array(self.p, dtype=np.float64)
        if p.ndim != 3 or p.shape[0] != p.shape[1] + 1 or p.shape[2] < 1:
            raise ValueError(f"acceptance model needs p of shape [N+1, N, K], got {p.shape}")
        if (p < 0).any() or (p.sum(-1) > 1 + 1e-9).any():
            raise ValueError("acceptance probabilities must be >= 0 and sum to <= 1 over the ranks of a depth")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        p.setflags(write=False)
        object.__setattr__(self, "p", p)

    @property
    def num_prompt_tokens(self) -> int:
        return self.p.shape[1]

    @property
    def topk(self) -> int:
        return self.p.shape[2]

    @classmethod
    def from_stats(cls, stats: AcceptanceStats, topk: int | None = None,
                   shrinkage: float = DEFAULT_SHRINKAGE) -> "AcceptanceModel":
        """The statistics' conditional estimates, made non-increasing in rank (a lower-ranked guess
        is never more likely right; equal-weight isotonic regression keeps each depth's total)."""
        p = stats.conditional(shrinkage)
        p = -np.apply_along_axis(monotone_fit, -1, -p)
        return cls(p[:, :, : topk or stats.topk], stats.ensemble)

    @classmethod
    def same_for_all_m(cls, per_depth: Sequence[Sequence[float]], ensemble: int = 1) -> "AcceptanceModel":
        """From [N, K] per-depth probabilities used in every state (synthetic models, tests)."""
        per_depth = np.asarray(per_depth, dtype=np.float64)
        return cls(np.repeat(per_depth[None], per_depth.shape[0] + 1, axis=0), ensemble)

    def path_probability(self, m: int, path: Path) -> float:
        prob = 1.0
        for depth, rank in enumerate(path):
            prob *= self.p[m, depth, rank] if rank < self.topk else 0.0
        return prob


@dataclass(frozen=True)
class Evaluation:
    """Predicted behaviour of a tree set on one device."""

    tokens_per_step: tuple[float, ...]     # R_m, bonus token included
    seconds_per_step: tuple[float, ...]    # L(T_m)
    num_tokens: tuple[int, ...]            # T_m
    transition: np.ndarray = field(repr=False, compare=False)   # [N+1, N+1] P(next m | m)
    occupancy: tuple[float, ...] = ()      # long-run share of steps in each m, starting from N
    mean_accepted: float = 0.0             # tokens per step (bonus included; vanilla = 1)
    tokens_per_second: float = 0.0
    speedup: float = 0.0                   # over vanilla: one token per L(1)

    @property
    def budget(self) -> int:
        """The largest tree of the set in tokens (what an engine must hold)."""
        return max(self.num_tokens)


def evaluate(trees: PPDTreeSet, model: AcceptanceModel, latency: LatencyFn) -> Evaluation:
    """Expected tokens per step, tokens per second and speedup of `trees` under `model`."""
    n = model.num_prompt_tokens
    if trees.num_prompt_tokens != n:
        raise TreeError(f"trees are for N={trees.num_prompt_tokens}, the statistics for N={n}")
    rewards, seconds, sizes, transition = [], [], [], np.zeros((n + 1, n + 1))
    for m, step in enumerate(trees.trees):
        nodes = [((), step.prompt_counts[0])] + list(zip(step.tree.paths, step.prompt_counts[1:]))
        reward, size, row = _tree_outcome(nodes, model, m)
        rewards.append(reward)
        sizes.append(size)
        seconds.append(latency(size))
        transition[m] = row
    return _rate(rewards, seconds, sizes, transition, latency(1))


def _tree_outcome(nodes: list[tuple[Path, int]], model: AcceptanceModel, m: int) -> tuple[float, int, np.ndarray]:
    """(R, T, next-state distribution) of one tree given as (path, prompt count) pairs."""
    n = model.num_prompt_tokens
    accept = {path: model.path_probability(m, path) for path, _ in nodes}
    last = dict(accept)
    for path in accept:
        if path:
            last[path[:-1]] -= accept[path]
    row = np.zeros(n + 1)
    for path, count in nodes:
        row[count] += max(last[path], 0.0)
    size = len(nodes) + model.ensemble * sum(count for _, count in nodes)
    return float(sum(accept.values())), size, row / row.sum()


def _long_run(transition: np.ndarray, start: int) -> np.ndarray:
    """Cesaro-limit distribution of the chain started at `start` (periodic chains included): the
    lazy chain (I + P)/2 has the same limit and is aperiodic, so repeated squaring converges."""
    lazy = 0.5 * (np.eye(len(transition)) + transition)
    for _ in range(60):
        lazy = lazy @ lazy
    dist = lazy[start]
    return dist / dist.sum()


def _rate(rewards, seconds, sizes, transition, vanilla_seconds: float) -> Evaluation:
    n = len(rewards) - 1
    occupancy = _long_run(transition, start=n)
    mean_accepted = float(occupancy @ rewards)
    tokens_per_second = mean_accepted / float(occupancy @ seconds)
    return Evaluation(tuple(float(r) for r in rewards), tuple(float(s) for s in seconds), tuple(int(s) for s in sizes),
                      transition, tuple(float(x) for x in occupancy), mean_accepted, tokens_per_second,
                      tokens_per_second * vanilla_seconds)


def replay(trees: PPDTreeSet, steps: Sequence[tuple[int, ...]]) -> tuple[float | None, ...]:
    """Tokens per step of each m's tree replayed on recorded steps (trees.stats records): walk the tree
    along each record's true ranks, no independence assumption. A check of the product model on the
    calibration data; None where no record has m rows."""
    out = []
    for m, step in enumerate(trees.trees):
        nodes = {(): None, **{p: None for p in step.tree.paths}}
        lengths = []
        for record in steps:
            ranks = record[1:]
            if len(ranks) < m:
                continue
            depth = 0
            while depth < m and tuple(ranks[: depth + 1]) in nodes:
                depth += 1
            lengths.append(depth + 1)
        out.append(float(np.mean(lengths)) if lengths else None)
    return tuple(out)


# --- one state's tree: exact knapsack over the candidate paths ----------------------------------

@dataclass(frozen=True)
class _Candidates:
    paths: tuple[Path, ...]               # best-first by acceptance probability: parents before children
    accept: np.ndarray                    # [C] a(v)
    children: tuple[tuple[int, ...], ...]


def _candidates(model: AcceptanceModel, m: int, topk: int, limit: int) -> _Candidates:
    """The `limit` paths of highest a(v) for state m (root included, ranks < topk, depth <= m)."""
    paths, accept, index = [], [], {}
    heap = [(-1.0, ())]
    while heap and len(paths) < limit:
        neg, path = heapq.heappop(heap)
        index[path] = len(paths)
        paths.append(path)
        accept.append(-neg)
        if len(path) < m:
            for rank in range(min(topk, model.topk)):
                prob = -neg * model.p[m, len(path), rank]
                if prob > 0:
                    heapq.heappush(heap, (-prob, path + (rank,)))
    children: list[list[int]] = [[] for _ in paths]
    for i, path in enumerate(paths[1:], 1):
        children[index[path[:-1]]].append(i)
    return _Candidates(tuple(paths), np.asarray(accept), tuple(tuple(c) for c in children))


@lru_cache(maxsize=8)
def _diagonals(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    total, given = np.arange(n)[:, None], np.arange(n)[None, :]
    rest = total - given
    return np.clip(rest, 0, None), np.broadcast_to(given, (n, n)), rest >= 0


def _max_plus(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z[s] = max_i x[s - i] + y[i], and the maximising i (the budget given to y)."""
    rest, given, valid = _diagonals(len(x))
    table = np.where(valid, x[rest] + y[given], _NEG)
    arg = table.argmax(1)
    return table[np.arange(len(x)), arg], arg


def _best_tree(cands: _Candidates, values: np.ndarray, rho: float, latency: np.ndarray, ensemble: int,
               budget: int, min_root_count: int) -> tuple[float, list[tuple[Path, int]]]:
    """Maximise sum_v a(v) (1 + h(c_v)) - sum_{v != root} a(v) h(c_parent(v)) - rho L(T) over trees
    of candidate nodes with T <= budget; `values` = h over next states 0..N, `latency` [budget+1]
    seconds per tree size (index 0 unused)."""
    counts = range(len(values))
    width = budget + 1
    best: list[np.ndarray] = [None] * len(cands.paths)  # type: ignore[list-item]
    best_count: list[np.ndarray] = [None] * len(cands.paths)  # type: ignore[list-item]
    splits: list[dict[int, list[np.ndarray]]] = [{} for _ in cands.paths]
    for u in reversed(range(len(cands.paths))):
        a_u = cands.accept[u]
        top, top_count = np.full(width, _NEG), np.full(width, -1)
        for c in counts:
            cost = 1 + ensemble * c
            if cost > budget or (u == 0 and c < min_root_count):
                continue
            table = np.full(width, _NEG)
            table[cost] = a_u * (1.0 + values[c])
            for w in cands.children[u]:
                child = best[w] - cands.accept[w] * values[c]
                child[0] = 0.0  # child left out
                table, given = _max_plus(table, child)
                splits[u].setdefault(c, []).append(given)
            better = table > top
            top, top_count = np.where(better, table, top), np.where(better, c, top_count)
        best[u], best_count[u] = top, top_count
    net = np.full(width, _NEG)
    net[1:] = best[0][1:] - rho * latency[1:]
    size = int(np.argmax(net))
    if not np.isfinite(net[size]):
        raise TreeError(f"no valid tree fits a budget of {budget} tokens (ensemble k={ensemble})")

    nodes: list[tuple[Path, int]] = []
    stack = [(0, size)]
    while stack:
        u, b = stack.pop()
        c = int(best_count[u][b])
        nodes.append((cands.paths[u], c))
        for j in reversed(range(len(cands.children[u]))):
            given = int(splits[u][c][j][b])
            if given:
                stack.append((cands.children[u][j], given))
            b -= given
    return float(net[size]), nodes


# --- all states: policy iteration -----------------------------------------------------------------

@dataclass(frozen=True)
class SearchConfig:
    budgets: tuple[int, ...] = DEFAULT_BUDGETS   # fixed budgets of the curve; the largest caps the search
    topk: int = 10                               # ranks considered per depth (at most the statistics' K)
    candidates_per_token: int = 4                # candidate paths considered per token of budget
    shrinkage: float = DEFAULT_SHRINKAGE         # pseudo-observations pulling p_m towards the pooled p
    max_iterations: int = 50
    # A tree for steps of B >= 2 sequences must be predicted at least this much faster than vanilla at B,
    # else that B decodes without one (tools/treesearch/batch.py: what the prediction leaves out).
    min_batch_speedup: float = 1.10

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive token counts, got {self.budgets}")
        if self.min_batch_speedup < 1.0:
            raise ValueError(f"min_batch_speedup must be >= 1 (a tree slower than vanilla is never chosen), got "
                             f"{self.min_batch_speedup}")
        if self.topk < 1 or self.candidates_per_token < 1 or self.max_iterations < 1:
            raise ValueError("topk, candidates_per_token and max_iterations must be >= 1")


def _to_tree_set(policy: list[list[tuple[Path, int]]], n: int) -> PPDTreeSet:
    topk = 1 + max((max(path) for nodes in policy for path, _ in nodes if path), default=0)
    steps = []
    for nodes in policy:
        count = dict(nodes)
        tree = Tree(paths=tuple(p for p in count if p), topk=topk)
        steps.append(PPDStepTree(tree, (count[()],) + tuple(count[p] for p in tree.paths)))
    return PPDTreeSet(n, topk, tuple(steps))


def search(model: AcceptanceModel, latency: LatencyFn, budget: int, config: SearchConfig = SearchConfig(),
           ) -> tuple[PPDTreeSet, Evaluation]:
    """The tree set with the most tokens per second of `latency` among trees of T <= budget tokens.
    (Pass a constant latency for the set with the most tokens per step.)"""
    n, k = model.num_prompt_tokens, model.ensemble
    if budget < 1 + k:
        raise TreeError(f"a budget of {budget} tokens cannot hold the root and one prompt token (k={k}); "
                        f"the tree for 0 predictions needs at least {1 + k}")
    seconds_by_size = np.array([np.nan] + [latency(t) for t in range(1, budget + 1)])
    cands = [_candidates(model, m, config.topk, config.candidates_per_token * budget) for m in range(n + 1)]
    values, rho = np.zeros(n + 1), 0.0
    policy = [_best_tree(cands[m], values, rho, seconds_by_size, k, budget, 1 if m == 0 else 0)[1]
              for m in range(n + 1)]
    best: tuple[float, list] | None = None
    for _ in range(config.max_iterations):
        outcomes = [_tree_outcome(nodes, model, m) for m, nodes in enumerate(policy)]
        rewards = np.array([r for r, _, _ in outcomes])
        seconds = np.array([seconds_by_size[t] for _, t, _ in outcomes])
        transition = np.stack([row for _, _, row in outcomes])
        occupancy = _long_run(transition, start=n)
        rho = float(occupancy @ rewards / (occupancy @ seconds))
        if best is None or rho > best[0] * (1 + 1e-12):
            best = (rho, [list(nodes) for nodes in policy])
        # Relative values: h = R - rho L + P h, pinned by h(N) = 0 (least squares copes with states
        # that never recur under the current trees).
        system = np.vstack([np.eye(n + 1) - transition, np.eye(n + 1)[n]])
        values = np.linalg.lstsq(system, np.append(rewards - rho * seconds, 0.0), rcond=None)[0]
        changed = False
        for m in range(n + 1):
            current = rewards[m] - rho * seconds[m] + transition[m] @ values
            gain, nodes = _best_tree(cands[m], values, rho, seconds_by_size, k, budget, 1 if m == 0 else 0)
            if gain > current + 1e-9 * max(1.0, abs(current)):
                policy[m], changed = nodes, True
        if not changed:
            break
    trees = _to_tree_set(_drop_unreachable(best[1], n), n)
    return trees, evaluate(trees, model, latency)


def _drop_unreachable(policy: list[list[tuple[Path, int]]], n: int) -> list[list[tuple[Path, int]]]:
    """Trees of states the decode can never enter (no reachable node carries that many prompt
    tokens; decoding starts in N) become root-only, so they do not inflate the engine's budget."""
    reached, frontier = {n}, [n]
    while frontier:
        for _, count in policy[frontier.pop()]:
            if count not in reached:
                reached.add(count)
                frontier.append(count)
    return [nodes if m in reached else [((), 1 if m == 0 else 0)] for m, nodes in enumerate(policy)]


@dataclass(frozen=True)
class SearchResult:
    trees: PPDTreeSet                      # the chosen set: most tokens per second, T <= max budget
    evaluation: Evaluation
    curve: tuple[tuple[int, PPDTreeSet, Evaluation], ...]   # per fixed budget: most tokens per step


def search_curve(model: AcceptanceModel, latency: LatencyFn, config: SearchConfig = SearchConfig(),
                 max_tokens: int | None = None) -> SearchResult:
    """The latency-aware tree set (T <= the largest budget, at most `max_tokens`) and, per fixed
    budget, the set with the most tokens per step, both evaluated on `latency`."""
    budgets = sorted({b for b in config.budgets if max_tokens is None or b <= max_tokens})
    if not budgets:
        raise TreeError(f"no budget in {config.budgets} is within the profiled sizes (<= {max_tokens})")
    curve = []
    for budget in budgets:
        trees, _ = search(model, lambda t: 1.0, budget, config)
        curve.append((budget, trees, evaluate(trees, model, latency)))
    trees, evaluation = search(model, latency, budgets[-1], config)
    return SearchResult(trees, evaluation, tuple(curve))
