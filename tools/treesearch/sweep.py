"""Measured check of a searched tree: the chosen tree against the best tree of each fixed budget, the
hand-picked tree and vanilla, on one backend in one run (the library half of `python -m tools trees sweep`)."""

from __future__ import annotations

from pathlib import Path

from tools.bench.harness import generator_runner, run_interleaved
from tools.bench.report import median_tokens_per_s
from tools.bench.runs import PromptRun
from export.methods import METHODS
from trees import PPDTreeSet, check_tree_identity, load_ppd_trees
from trees.devices import DEFAULT_VARIANT
from trees.latency import LatencyProfile
from trees.search import AcceptanceModel, Evaluation, SearchConfig, evaluate, search_curve

VANILLA = "vanilla"


def reference_evaluations(method: str, model: AcceptanceModel, profile: LatencyProfile,
                          n: int) -> list[tuple[str, Evaluation]]:
    """The method's hand-picked default tree, evaluated the same way (when it fits N and the profile)."""
    hand = load_ppd_trees(METHODS[method].hand_picked_tree)
    if hand.num_prompt_tokens != n or hand.max_tokens(model.ensemble) > profile.max_tokens:
        return []
    return [("hand-picked tree", evaluate(hand, model, profile.latency))]


def sweep_variants(method: str, tree_path: Path, identity, model: AcceptanceModel, profile: LatencyProfile,
                   budgets: tuple[int, ...], engine_variant: str = DEFAULT_VARIANT) -> dict[str, PPDTreeSet | None]:
    """{label: trees}: vanilla (None), the chosen tree, the hand-picked tree (same N only), the best tree
    per fixed budget. `identity` is the tools.treesearch.acceptance.CheckpointIdentity the chosen tree must match,
    `engine_variant` the quantized engine variant it runs on (export/quantize.py)."""
    chosen = load_ppd_trees(tree_path)
    check_tree_identity(chosen, identity.model_fingerprint, identity.checkpoint_sha256, engine_variant)
    variants: dict[str, PPDTreeSet | None] = {VANILLA: None, f"chosen ({tree_path.name})": chosen}
    hand_picked = load_ppd_trees(METHODS[method].hand_picked_tree)
    if hand_picked.num_prompt_tokens == identity.config.num_prompt_tokens:
        variants["hand-picked"] = hand_picked
    fixed = search_curve(model, profile.latency, SearchConfig(budgets=budgets, topk=model.topk),
                         max_tokens=profile.max_tokens).curve
    variants.update({f"fixed budget {b}": trees for b, trees, _ in fixed})
    return variants


def sweep_generators(base, config, variants: dict[str, PPDTreeSet | None]) -> dict:
    """{label: Generator}: one backend (and engine) shared by all variants, only the proposers differ.
    `base` is a Generator of the method; `config` its proposer config (prompt tokens / maps, ensemble)."""
    from runtime.generator import Generator
    from runtime.proposers import VanillaProposer
    from runtime.proposers.ppd import PPDProposer

    vocab, eos = base.backend.info.vocab_size, sorted(base.eos_token_ids)
    return {label: Generator(base.backend, base.tokenizer,
                             VanillaProposer() if trees is None else PPDProposer(config, trees, vocab), eos)
            for label, trees in variants.items()}


def run_sweep(generators: dict, encoded: list[list[int]], max_new_tokens: int,
              repeats: int) -> dict[str, list[list[PromptRun]]]:
    """{label: [repeat][prompt] PromptRun}, repeats interleaved across variants."""
    runners = {label: generator_runner(gen, max_new_tokens) for label, gen in generators.items()}
    results, _ = run_interleaved(runners, encoded, repeats, desc="sweep")   # our generators only: none fail
    return results


def sweep_rows(runs: dict[str, list[list[PromptRun]]], variants: dict[str, PPDTreeSet | None],
               model: AcceptanceModel, profile: LatencyProfile, ensemble: int) -> list[dict]:
    """One row per variant: measured tokens/s (median over repeats), accepted tokens per decode step, the
    search's prediction for it and how many prompts match vanilla; speedup against the vanilla row."""
    reference = [r.token_ids for r in runs[VANILLA][0]]
    rows = []
    for label, reps in runs.items():
        trees = variants[label]
        predicted = None if trees is None else evaluate(trees, model, profile.latency)
        first = reps[0]
        decode_steps = sum(r.steps - 1 for r in first)  # prefill left out: what the search predicts
        rows.append({
            "variant": label,
            "budget": 1 if trees is None else trees.max_tokens(ensemble),
            "tokens_per_s": median_tokens_per_s(reps),
            "mean_accepted": sum(r.accepted_tokens - 1 for r in first) / max(decode_steps, 1),
            "predicted_mean_accepted": None if predicted is None else predicted.mean_accepted,
            "predicted_speedup": None if predicted is None else predicted.speedup,
            "matches_vanilla": sum(r.token_ids == t for r, t in zip(first, reference)),
        })
    vanilla_speed = next(r["tokens_per_s"] for r in rows if r["variant"] == VANILLA)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / vanilla_speed
    return rows


def format_sweep(rows: list[dict], num_prompts: int) -> str:
    width = max(len("variant"), *(len(r["variant"]) for r in rows)) + 2
    lines = [f"{'variant':<{width}}{'T':>4}{'tokens/s':>10}{'speedup':>9}{'accepted':>10}{'predicted':>11}"
             f"{'pred. speedup':>15}{'same':>8}"]
    for r in rows:
        pred = "-" if r["predicted_mean_accepted"] is None else f"{r['predicted_mean_accepted']:.2f}"
        pred_speed = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x"
        lines.append(f"{r['variant']:<{width}}{r['budget']:>4}{r['tokens_per_s']:>10.1f}{r['speedup']:>8.2f}x"
                     f"{r['mean_accepted']:>10.2f}{pred:>11}{pred_speed:>15}{r['matches_vanilla']:>5}/{num_prompts}")
    return "\n".join(lines)
