"""The commands of `python -m tools trees` (tools/treesearch/cli.py) as configs, one per command and
mapped to argparse (their defaults live here only), and the paths every command derives from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.manifest import DEFAULT_MAX_TREE
from export.methods import METHODS, STATS_METHODS, TREE_SEARCH_METHODS
from export.paths import DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT, VARIANTS
from tools.treesearch.acceptance import CalibrationRun, StatsConfig, method_checkpoint
from tools.bench.prompts import PROMPTS_HELP
from tools.treesearch.ngram_acceptance import NgramStatsConfig
from runtime.backends import DEFAULT_DTYPE, DTYPES
from runtime.loading import BACKENDS
from tools.bench.harness import BenchConfig
from runtime.generator import DEFAULT_MAX_NEW_TOKENS
from tools.latency.profile import DEFAULT_CONTEXT, DEFAULT_REPEATS
from tools.treesearch.files import ngram_stats_filename, search_inputs, stats_filename
from trees.config_args import option
from trees.search import DEFAULT_BUDGETS, SearchConfig
from trees.stats import DEFAULT_SHRINKAGE


PROG = "python -m tools trees"
CHECKPOINT_HELP = "the method's checkpoint: ppd prompt tokens or ht transfer maps (default: the committed one)"
VARIANT_HELP = (f"the engine's weights: {', '.join(VARIANTS)} (a quantized variant: --backend onnxruntime, "
                f"export/quantize.py); its files are its own")
CALIBRATION_PROMPTS_HELP = ("decode these prompts instead of the ShareGPT calibration split, from the workload the "
                            "trees will serve: " + PROMPTS_HELP + "; leave out the prompts `bench` evaluates on "
                            "(its --limit 20 runs the first 20)")
BACKEND_CHOICES = tuple(BACKENDS)
DEFAULT_BACKEND = StatsConfig.backend  # the reference backend
DEFAULT_METHOD = StatsConfig.method


# --- configs: one per command, mapped to argparse (defaults live here only) ------------------------

@dataclass(frozen=True)
class CalibrationFlags:
    """The flags of tools.treesearch.acceptance.CalibrationRun: what both statistics decode."""
    model_dir: str = option(CalibrationRun.model_dir, "model checkpoint dir")
    backend: str = option(CalibrationRun.backend, "backend that decodes", choices=BACKEND_CHOICES)
    device: str = option(CalibrationRun.device, "cpu or cuda")
    variant: str = option(CalibrationRun.variant, VARIANT_HELP, choices=VARIANTS)
    num_prompts: int = option(CalibrationRun.num_prompts, "calibration prompts to decode")
    max_new_tokens: int = option(CalibrationRun.max_new_tokens, "tokens generated per prompt")
    max_prompt_tokens: int = option(CalibrationRun.max_prompt_tokens, "skip longer calibration prompts")
    prompts: str | None = option(None, CALIBRATION_PROMPTS_HELP)


@dataclass(frozen=True)
class StatsCommand(CalibrationFlags):
    method: str = option(DEFAULT_METHOD, "graph whose slots are measured (hybrid uses ppd's)", choices=STATS_METHODS)
    checkpoint: str | None = option(StatsConfig.checkpoint, CHECKPOINT_HELP)
    topk: int = option(StatsConfig.topk, "ranks recorded per prediction row")
    out: str | None = option(None, "output JSON (default: <method>-acceptance[-<variant>].json next to the checkpoint)")


@dataclass(frozen=True)
class NgramStatsCommand(CalibrationFlags):
    max_depth: int = option(NgramStatsConfig.max_depth, "proposal tokens compared per position")
    out: str | None = option(None, f"output JSON (default: {ngram_stats_filename()}, or "
                                   f"{ngram_stats_filename('<variant>')}, next to the ppd checkpoint)")


@dataclass(frozen=True)
class ProfileCommand:
    gpu: str = option(help="the device present: 'cpu', or part of the GPU's name (e.g. h100)")
    backend: str = option(DEFAULT_BACKEND, "backend to time", choices=BACKEND_CHOICES)
    variant: str = option(DEFAULT_VARIANT, VARIANT_HELP, choices=VARIANTS)
    device: str | None = option(None, "cpu or cuda (default: cpu for --gpu cpu, else cuda)")
    model_dir: str = option(str(DEFAULT_MODEL_DIR), "model checkpoint dir")
    checkpoint: str = option(str(METHODS["ppd"].default_checkpoint), "PPD prompt-token checkpoint")
    method: str = option("ppd", "graph timed: ppd (with its prompt-token rows) or vanilla (before prompt tokens "
                                "exist; same cost)", choices=("ppd", "vanilla"))
    max_tokens: int = option(DEFAULT_MAX_TREE, "largest tree timed (the engines' default max tree); every size "
                                               "1..max is timed")
    context: int = option(DEFAULT_CONTEXT, "committed cache entries while timing")
    dtype: str = option(DEFAULT_DTYPE, "torch backend precision (fp16 / bf16 for GPUs)", choices=DTYPES)
    repeats: int = option(DEFAULT_REPEATS, "timed steps per size (median), spread over rounds")
    rounds: int = option(5, "sweeps over all sizes, so that load changes on a shared machine hit every size alike")
    batch_sizes: str = option("", "comma list of B > 1: also time steps of B sequences together, each with a tree of "
                                  "every size up to B x T <= --max-tokens (what the tree search for B requests at a "
                                  "time reads; e.g. 2,4,8,16)")
    out: str | None = option(None, "output JSON (default: latency-<device>-<backend>[-<variant>].json next to the "
                                   "checkpoint)")
    force: bool = option(False, "write the profile even when the machine was busy (load, spread of the repeats: "
                                "trees/quiet.py); the profile then says so")


@dataclass(frozen=True, kw_only=True)
class SearchRun:
    """What build and sweep share: the device, the method's checkpoint and the search inputs beside it."""
    gpu: str = option(help="device the tree is for: 'cpu' or part of the GPU's name; matched against the "
                           "device present and the profile's recorded one")
    backend: str = option(DEFAULT_BACKEND, "backend", choices=BACKEND_CHOICES)
    variant: str = option(DEFAULT_VARIANT, VARIANT_HELP, choices=VARIANTS)
    device: str | None = option(None, "cpu or cuda (default: from --gpu)")
    model_dir: str = option(str(DEFAULT_MODEL_DIR), "model checkpoint dir")
    method: str = option(DEFAULT_METHOD, "method whose trees these are", choices=TREE_SEARCH_METHODS)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    stats: str | None = option(None, "acceptance statistics (default: the variant's next to the checkpoint)")
    profile: str | None = option(None, "latency profile (default: the variant's next to the checkpoint whose device "
                                       "matches --gpu)")
    ngram_stats: str | None = option(None, f"hybrid: n-gram statistics (default: {ngram_stats_filename()}, or "
                                           f"{ngram_stats_filename('<variant>')}, next to the checkpoint)")


@dataclass(frozen=True, kw_only=True)
class BuildCommand(SearchRun):
    profile_if_missing: bool = option(False, "measure the profile first when there is no measured one, or it was "
                                             "measured on another graph than the engine dir holds now; on a machine "
                                             "without that GPU, model it (roofline of the GPU's datasheet: a "
                                             "provisional tree)")
    stats_if_missing: bool = option(False, "collect the statistics the search reads first when their file is missing "
                                           "or was measured on another graph than the engine dir holds now (`stats`, "
                                           "and `ngram-stats` for hybrid, on this run's model, checkpoint, backend, "
                                           "device and variant; their other settings the defaults)")
    update_committed: bool = option(False, "write the tree (and the profile it used) next to the checkpoint, the "
                                           "committed files, instead of artifacts/trees/<model>/")
    out: str | None = option(None, "tree JSON (default: <method>-tree-<device>-<backend>[-<variant>].json in "
                                   "artifacts/trees/<model>/, or next to the checkpoint with --update-committed)")
    budgets: str = option(",".join(map(str, DEFAULT_BUDGETS)),
                          "fixed budgets of the curve; the largest caps the chosen tree")
    topk: int = option(SearchConfig.topk, "ranks considered per depth")
    shrinkage: float = option(DEFAULT_SHRINKAGE, "pseudo-counts pulling per-m statistics towards the pooled ones")
    candidates_per_token: int = option(SearchConfig.candidates_per_token, "candidate paths per token of budget")
    min_batch_speedup: float = option(SearchConfig.min_batch_speedup, "a tree for steps of B >= 2 sequences must be "
                                      "predicted this many times vanilla at B, else B decodes without one")
    plots: bool = option(True, "write the PNGs next to the tree")


@dataclass(frozen=True, kw_only=True)
class SweepCommand(SearchRun):
    tree: str | None = option(None, "the chosen tree (default: this device's searched tree)")
    budgets: str = option("4,8,16,32,64", "fixed budgets compared with the chosen tree")
    prompts: str = option(BenchConfig.prompts, PROMPTS_HELP)
    limit: int | None = option(None, "first N prompts only")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "new tokens per prompt")
    repeats: int = option(1, "timed repeats (interleaved; medians reported)")
    out: str | None = option(None, "write the report JSON here")


@dataclass(frozen=True)
class PlotLatencyCommand:
    gpu: str = option(help="the device whose profiles are drawn: 'cpu', or part of the GPU's name")
    backend: str = option(DEFAULT_BACKEND, "backend", choices=BACKEND_CHOICES)
    checkpoint: str = option(str(METHODS["ppd"].default_checkpoint), "the checkpoint whose dir holds the profiles "
                                                                     "(and artifacts/trees/<its dir>/)")
    out: str | None = option(None, "PNG (default: latency-<device>-<backend>-variants.png in artifacts/trees/<model>/)")


@dataclass(frozen=True)
class PredictCommand:
    tree: str = option(help="a tree file as `build` wrote it (ppd, ht or hybrid)")
    stats: str = option(help="acceptance statistics of the tree's graph, e.g. `stats --prompts FILE --out ...`")
    ngram_stats: str | None = option(None, "n-gram statistics, for a hybrid tree (e.g. `ngram-stats --prompts FILE`)")


# --- shared helpers ---------------------------------------------------------------------------------

def checkpoint_path(cfg) -> Path:
    return method_checkpoint(cfg.method, cfg.checkpoint)


def stats_path(cfg) -> Path:
    return (Path(cfg.stats) if cfg.stats
            else checkpoint_path(cfg).parent / stats_filename(METHODS[cfg.method].graph, cfg.variant))


def load_search_inputs(cfg, profile_path: Path):
    """Statistics and profile, both checked against the model, checkpoint and engine variant loaded now."""
    return search_inputs(cfg.model_dir, checkpoint_path(cfg), cfg.method, stats_path(cfg), profile_path, cfg.variant)


def variant_flag(cfg) -> str:
    """The --variant flag that repeats this run's variant in a suggested command ('' for fp32)."""
    return "" if cfg.variant == DEFAULT_VARIANT else f" --variant {cfg.variant}"


def ngram_stats_path(cfg) -> Path:
    return Path(cfg.ngram_stats) if cfg.ngram_stats else checkpoint_path(cfg).parent / ngram_stats_filename(cfg.variant)
