"""python -m tools trees: hardware-aware trees for PPD, hybrid and HT (--method ppd|hybrid|ht; same
tree format, N = k for HT). The top floor's CLI over the search in trees/: it runs the backends to
measure, then hands plain JSON to trees/.

    python -m tools trees stats                  acceptance statistics on held-out ShareGPT prompts
    python -m tools trees ngram-stats            how often the n-gram source is right (for hybrid)
    python -m tools trees profile --gpu cpu --backend onnxruntime
                                                   step latency against tree size on the present device
    python -m tools trees build --gpu cpu --backend onnxruntime [--profile-if-missing]
                                                   search the tree set, write it with its pictures
    python -m tools trees sweep --gpu cpu --backend onnxruntime --prompts mtbench
                                                   benchmark the chosen tree against fixed budgets,
                                                   the hand-picked tree and vanilla, in one run
    python -m tools trees predict --tree FILE --stats FILE [--ngram-stats FILE]
                                                   a searched tree's expected tokens per step on other
                                                   statistics (e.g. `stats --prompts` of a workload)

Files live next to the method's checkpoint (checkpoints/<model>/): <graph>-acceptance.json (hybrid
searches on ppd's, plus ngram-acceptance.json),
latency-<device key>-<backend>.json (one per device, shared by both methods: see trees/devices.py),
<method>-tree-<device key>-<backend>.json and its PNGs. `build` writes its tree (and a profile it
measures or models) under artifacts/trees/<model>/ unless --update-committed or --out says otherwise,
and does nothing when the tree there or the committed one was searched from the same inputs
(export/tree_store.py). On a machine without the GPU named, --profile-if-missing models the profile
from the GPU's datasheet (trees/roofline.py) and the tree records that it is provisional.

--variant int8|int4 (with --backend onnxruntime) runs every command on that weight-only quantized
engine (export/quantize.py): its files add the variant to the name (ppd-acceptance-int4.json,
ngram-acceptance-int4.json, latency-cpu-onnxruntime-int4.json, ppd-tree-cpu-onnxruntime-int4.json),
record it, and are refused for another variant; fp32 keeps the names above. `build` also draws the
latency curves of every variant profiled for the device (latency-<key>-<backend>-variants.png).

    python -m tools trees roofline --gpu h200 [--compare PROFILE]
                                                   the modelled step curve (against a measured one)
    python -m tools trees plot-latency --gpu cpu --backend onnxruntime
                                                   the latency curves of the device's engine variants
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.checkpoint import CheckpointError
from export.methods import METHODS
from export.ppd import PromptTokenError
from tools.treesearch.roofline import RooflineCommand, cmd_roofline
from tools.treesearch.commands import (PROG, BuildCommand, NgramStatsCommand, PlotLatencyCommand, PredictCommand,
                                   ProfileCommand, StatsCommand, SweepCommand, checkpoint_path, load_search_inputs)
from tools.treesearch.measure import cmd_ngram_stats, cmd_profile, cmd_stats
from tools.treesearch.build import cmd_build, variant_profiles, write_variant_latencies
from tools.treesearch.files import check_variant_backend, parse_budgets, present
from export.tree_store import generated_dir, search_dirs
from trees import TreeError
from trees.config_args import add_config_command, config_from_args, exit_code_of
from trees.devices import (DeviceMismatchError, device_key, profile_filename, tree_filename,
                           variant_latencies_filename)
from trees.latency import ProfileError
from trees.search import AcceptanceModel, SearchConfig
from trees.ngram_stats import NgramStatsError, load_ngram_stats
from trees.stats import StatsError, load_stats


def _first_existing(directory: Path, name: str) -> Path:
    """`name` in the first of the generated and committed dirs that has it (else the committed path)."""
    return next((d / name for d in search_dirs(directory) if (d / name).is_file()), directory / name)


def cmd_plot_latency(cfg: PlotLatencyCommand, argv: list[str]) -> int:
    """The step latency curves of every engine variant (fp32, int8, int4) profiled for a device and
    backend, on one picture (absolute, and relative to each variant's own one-token step)."""
    directory = Path(cfg.checkpoint).parent
    profiles = variant_profiles(directory, cfg.gpu, cfg.backend)
    if not profiles:
        raise ProfileError(f"no {cfg.backend} latency profile for --gpu {cfg.gpu} in {generated_dir(directory)} or "
                           f"{directory}: measure them with `{PROG} profile --gpu {cfg.gpu} --backend {cfg.backend} "
                           f"--variant ...`")
    first = profiles[0]
    out = write_variant_latencies(profiles, Path(cfg.out) if cfg.out else generated_dir(directory) /
                                  variant_latencies_filename(first.device_key, first.backend))
    print(f"wrote {out}: " + "; ".join(f"{p.variant} T=1 {1e3 * p.latency(1):.1f} ms, T=2 "
                                       f"{p.latency(min(2, p.max_tokens)) / p.latency(1):.2f}x" for p in profiles))
    return 0


def cmd_sweep(cfg: SweepCommand, argv: list[str]) -> int:
    """Measured tokens/s and accepted tokens of the chosen tree, the best tree of each fixed budget,
    the hand-picked tree and vanilla, on one backend in one run (repeats interleaved)."""
    from tools.bench.report import write_report
    from runtime.generator import Generator
    from tools.bench.prompts import load_prompts
    from tools.treesearch.sweep import format_sweep, run_sweep, sweep_generators, sweep_rows, sweep_variants

    if METHODS[cfg.method].ngram_candidates:
        raise ValueError(f"the sweep compares PPD tree sets; for {cfg.method} measure with `python -m tools bench "
                         f"--methods vanilla,ppd,ngram,{cfg.method}`")
    check_variant_backend(cfg.backend, cfg.variant)
    device, kind, name = present(cfg.gpu, cfg.device)
    directory, key = checkpoint_path(cfg).parent, device_key(kind, name)
    tree_path = Path(cfg.tree) if cfg.tree else _first_existing(directory, tree_filename(key, cfg.backend, cfg.method,
                                                                                          cfg.variant))
    profile_path = Path(cfg.profile) if cfg.profile else _first_existing(directory, profile_filename(
        key, cfg.backend, cfg.variant))
    identity, stats, profile = load_search_inputs(cfg, profile_path)
    model = AcceptanceModel.from_stats(stats, min(SearchConfig.topk, stats.topk))
    variants = sweep_variants(cfg.method, tree_path, identity, model, profile, parse_budgets(cfg.budgets),
                              cfg.variant)
    base = Generator.from_pretrained(cfg.model_dir, method=cfg.method, backend=cfg.backend, device=device,
                                     variant=cfg.variant, checkpoint=str(checkpoint_path(cfg)), tree=str(tree_path))
    generators = sweep_generators(base, identity.config, variants)
    items = load_prompts(cfg.prompts, cfg.limit)
    encoded = [base.encode(item.prompt) for item in items]
    runs = run_sweep(generators, encoded, cfg.max_new_tokens, cfg.repeats)
    rows = sweep_rows(runs, variants, model, profile, identity.config.ensemble)
    print(f"{cfg.prompts} x {len(items)} prompts, {cfg.max_new_tokens} new tokens, {profile.engine} on {name}, "
          f"median of {cfg.repeats} repeat(s); accepted = tokens per decode step (prefill left out)")
    print(format_sweep(rows, len(items)))
    if cfg.out:
        write_report({"prompts": cfg.prompts, "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens,
                      "backend": cfg.backend, "variant": cfg.variant, "device": name, "repeats": cfg.repeats,
                      "rows": rows}, cfg.out)
        print(f"wrote {cfg.out}")
    return 0 if all(r["matches_vanilla"] == len(items) for r in rows) else 1


def cmd_predict(cfg: PredictCommand, argv: list[str]) -> int:
    """A searched tree's expected accepted tokens per step on other statistics (trees/predict.py)."""
    from trees.ppd_tree import load_ppd_trees
    from trees.predict import predicted_mean_accepted

    trees = load_ppd_trees(cfg.tree)
    stats = load_stats(cfg.stats)
    ngram = load_ngram_stats(cfg.ngram_stats) if cfg.ngram_stats else ()
    expected = predicted_mean_accepted(trees, stats, ngram)
    meta = trees.metadata
    print(f"{cfg.tree}: {expected:.3f} tokens/step on {cfg.stats} ({stats.calibration or 'calibration not recorded'})")
    if "expected_mean_accepted" in meta:
        print(f"  the tree file expects {meta['expected_mean_accepted']:.3f} on its own statistics "
              f"({meta.get('search', {}).get('calibration', 'not recorded')})")
    return 0


# --- argparse -------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    """`python -m tools trees ARGV` (tools/commands.py hands over everything after "trees")."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, handler in (("stats", StatsCommand, cmd_stats), ("ngram-stats", NgramStatsCommand, cmd_ngram_stats),
                               ("profile", ProfileCommand, cmd_profile), ("build", BuildCommand, cmd_build),
                               ("sweep", SweepCommand, cmd_sweep), ("roofline", RooflineCommand, cmd_roofline),
                               ("plot-latency", PlotLatencyCommand, cmd_plot_latency),
                               ("predict", PredictCommand, cmd_predict)):
        add_config_command(sub, name, cls, handler)
    args = parser.parse_args(argv)
    errors = (CheckpointError, PromptTokenError, DeviceMismatchError, ProfileError, StatsError, NgramStatsError,
              TreeError, FileNotFoundError, ValueError)
    return exit_code_of(lambda: args.func(config_from_args(args), argv), errors)
