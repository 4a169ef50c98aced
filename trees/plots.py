"""Pictures of a tree search (matplotlib, Agg): the latency curve, expected accepted tokens and
speedup against tree size, and the chosen trees drawn. Written as PNGs next to the tree file. And
the latency curves of a device's engine variants (fp32, int8, int4) on one picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trees.atomic import atomic_path
from trees.latency import LatencyProfile
from trees.ppd_tree import PPDTreeSet
from trees.search import AcceptanceModel, Evaluation, SearchResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` atomically (a reader never sees half a picture), then free it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    _pyplot().close(fig)
    return Path(path)


def plot_latency(profile: LatencyProfile, chosen: Evaluation, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    sizes = np.asarray(profile.sizes)
    ax.plot(sizes, 1e3 * np.asarray(profile.seconds), "o", ms=3.5, color="0.55", label="median per size")
    ax.plot(sizes, 1e3 * profile.fitted, "-", color="tab:blue", lw=1.8, label="monotone fit (used by the search)")
    base = 1e3 * profile.latency(1)
    ax.axhline(base, ls=":", color="0.4", lw=1)
    ax.text(sizes[-1], base, "  vanilla step", va="bottom", ha="right", fontsize=8, color="0.3")
    used = [(m, t, share) for m, (t, share) in enumerate(zip(chosen.num_tokens, chosen.occupancy)) if share > 0.005]
    ax.plot([t for _, t, _ in used], [1e3 * profile.latency(t) for _, t, _ in used], "D", color="tab:red", ms=6,
            label="chosen trees: " + ", ".join(f"m={m} T={t} ({share:.0%} of steps)" for m, t, share in used))
    ax.set_xlabel("tokens per step T (candidates + prompt tokens)")
    ax.set_ylabel("step latency (ms)")
    ax.set_title(f"{profile.device_name} · {profile.engine} · context {profile.context}", fontsize=9)
    ax.set_xlim(0, sizes[-1] + 1)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_variant_latencies(profiles: Sequence[LatencyProfile], path: str | Path) -> Path:
    """The step latency of each engine variant against tree size (left, ms) and relative to its own
    one-token step (right: what the tree search trades against accepted tokens)."""
    if not profiles:
        raise ValueError("no latency profiles to draw: measure one with `python -m tools trees profile`")
    plt = _pyplot()
    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for profile in profiles:
        sizes = np.asarray(profile.sizes)
        line, = absolute.plot(sizes, 1e3 * profile.fitted, "-", lw=1.8,
                              label=f"{profile.variant}: T=1 {1e3 * profile.latency(1):.1f} ms")
        absolute.plot(sizes, 1e3 * np.asarray(profile.seconds), "o", ms=2.5, color=line.get_color(), alpha=0.6)
        relative.plot(sizes, profile.fitted / profile.latency(1), "-", lw=1.8, color=line.get_color(),
                      label=profile.variant)
    relative.axhline(1.0, ls=":", color="0.4", lw=1)
    absolute.set_ylabel("step latency (ms; dots: medians, line: monotone fit)")
    relative.set_ylabel("step latency / the variant's own T=1 step")
    for ax in (absolute, relative):
        ax.set_xlabel("tokens per step T (candidates + prompt tokens)")
        ax.set_xlim(0, None)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    first = profiles[0]
    fig.suptitle(f"{first.device_name} · {first.backend} · context {first.context} · engine variants", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_search(result: SearchResult, path: str | Path, title: str = "",
                references: Sequence[tuple[str, Evaluation]] = ()) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    budgets = [b for b, _, _ in result.curve]
    accepted = [e.mean_accepted for _, _, e in result.curve]
    speedup = [e.speedup for _, _, e in result.curve]
    ax.plot(budgets, accepted, "o-", color="tab:green", label="accepted tokens / step (best tree of each size)")
    ax.set_xlabel("tree budget (tokens per step)")
    ax.set_ylabel("expected accepted tokens per step", color="tab:green")
    ax.set_ylim(1, max(accepted + [result.evaluation.mean_accepted]) * 1.1)
    right = ax.twinx()
    right.plot(budgets, speedup, "s-", color="tab:purple", label="speedup over vanilla (same trees)")
    right.axhline(1.0, ls=":", color="0.5", lw=1)
    right.set_ylabel("expected speedup", color="tab:purple")
    chosen = result.evaluation
    right.plot([chosen.budget], [chosen.speedup], "*", ms=16, color="tab:red",
               label=f"chosen (latency-aware): {chosen.speedup:.2f}x, {chosen.mean_accepted:.2f} tok/step")
    markers = iter("v^<>ph")
    for label, evaluation in references:
        right.plot([evaluation.budget], [evaluation.speedup], next(markers, "x"), ms=9, color="0.3",
                   label=f"{label}: {evaluation.speedup:.2f}x, {evaluation.mean_accepted:.2f} tok/step")
    lo = min(speedup + [1.0] + [e.speedup for _, e in references])
    hi = max(speedup + [chosen.speedup] + [e.speedup for _, e in references])
    right.set_ylim(min(0.9, lo * 0.95), hi * 1.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    right.legend(handles, labels, fontsize=7.5, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _layout(paths: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[float, float]]:
    """(x = depth, y) per path: leaves one per row in rank order, parents centred on their children."""
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {(): []}
    for p in sorted(paths, key=lambda p: (len(p), p)):
        children.setdefault(p, [])
        children[p[:-1]].append(p)
    pos: dict[tuple[int, ...], tuple[float, float]] = {}
    row = [0.0]

    def place(p: tuple[int, ...]) -> float:
        kids = sorted(children[p])
        if not kids:
            y = row[0]
            row[0] += 1
        else:
            y = float(np.mean([place(k) for k in kids]))
        pos[p] = (len(p), y)
        return y

    place(())
    return pos


def plot_trees(trees: PPDTreeSet, model: AcceptanceModel, evaluation: Evaluation, path: str | Path,
               title: str = "") -> Path:
    plt = _pyplot()
    from matplotlib import colormaps

    n = trees.num_prompt_tokens
    heights = [max(1.0, len(_leaves(trees, m))) for m in range(n, -1, -1)]
    fig, axes = plt.subplots(n + 1, 1, figsize=(7.5, 1.2 + 0.42 * sum(heights) + 0.5 * (n + 1)), dpi=120,
                             gridspec_kw={"height_ratios": [h + 1.2 for h in heights]})
    cmap = colormaps["viridis"].resampled(n + 1)
    for ax, m in zip(np.atleast_1d(axes), range(n, -1, -1)):
        step = trees.trees[m]
        counts = dict(zip(((),) + step.tree.paths, step.prompt_counts))
        pos = _layout(step.tree.paths)
        for p, (x, y) in pos.items():
            if p:
                px, py = pos[p[:-1]]
                ax.plot([px, x], [py, y], "-", color="0.6", lw=1, zorder=1)
        for p, (x, y) in pos.items():
            ax.scatter([x], [y], s=300, color=cmap(counts[p]), edgecolors="k", linewidths=0.6, zorder=2)
            ax.text(x, y, "root" if not p else str(p[-1]), ha="center", va="center", fontsize=7,
                    color="w" if counts[p] < n * 0.6 else "k", zorder=3)
            if p:
                ax.text(x + 0.12, y - 0.32, f"{model.path_probability(m, p):.2f}", fontsize=6.5, color="0.35")
        share = evaluation.occupancy[m]
        ax.set_title(f"m = {m} predictions available · {share:.0%} of steps · T = {evaluation.num_tokens[m]} tokens "
                     f"· E[tokens] = {evaluation.tokens_per_step[m]:.2f}", fontsize=8, loc="left")
        ax.set_xlim(-0.5, n + 0.8)
        ax.set_ylim(max(y for _, y in pos.values()) + 0.7, -0.7)
        ax.set_xticks(range(n + 1))
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    np.atleast_1d(axes)[-1].set_xlabel("depth (node label: top-k rank; grey: acceptance probability)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", ms=9, markerfacecolor=cmap(c), markeredgecolor="k",
                          label=f"{c} prompt token{'' if c == 1 else 's'}") for c in range(n + 1)]
    lines = title.count("\n") + 1
    inches = fig.get_figheight()
    top = 1 - (0.35 + 0.17 * lines) / inches  # title lines, then the legend line
    fig.suptitle(title, fontsize=9, x=0.01, y=1 - 0.06 / inches, ha="left", va="top")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1 - (0.08 + 0.17 * lines) / inches), fontsize=7,
               ncol=n + 1, frameon=False, title="node colour:", title_fontsize=7, alignment="left")
    fig.tight_layout(rect=(0, 0, 1, top))
    return _save(fig, path)


def _leaves(trees: PPDTreeSet, m: int) -> list[tuple[int, ...]]:
    paths = trees.trees[m].tree.paths
    parents = {p[:-1] for p in paths}
    return [p for p in ((),) + paths if p not in parents]
