"""python -m runtime trees: hardware-aware trees for PPD, hybrid and HT (--method ppd|hybrid|ht; same
tree format, N = k for HT). The top floor's CLI over the search in trees/: it runs the backends to
measure, then hands plain JSON to trees/.

    python -m runtime trees stats                  acceptance statistics on held-out ShareGPT prompts
    python -m runtime trees ngram-stats            how often the n-gram source is right (for hybrid)
    python -m runtime trees profile --gpu cpu --backend onnxruntime
                                                   step latency against tree size on the present device
    python -m runtime trees build --gpu cpu --backend onnxruntime [--profile-if-missing]
                                                   search the tree set, write it with its pictures
    python -m runtime trees sweep --gpu cpu --backend onnxruntime --prompts mtbench
                                                   benchmark the chosen tree against fixed budgets,
                                                   the hand-picked tree and vanilla, in one run
    python -m runtime trees predict --tree FILE --stats FILE [--ngram-stats FILE]
                                                   a searched tree's expected tokens per step on other
                                                   statistics (e.g. `stats --prompts` of a workload)

Files live next to the method's checkpoint (checkpoints/<model>/): <graph>-acceptance.json (hybrid
searches on ppd's, plus ngram-acceptance.json),
latency-<device key>-<backend>.json (one per device, shared by both methods: see trees/devices.py),
<method>-tree-<device key>-<backend>.json and its PNGs. `build` writes its tree (and a profile it
measures or models) under artifacts/trees/<model>/ unless --update-committed or --out says otherwise,
and does nothing when the tree there or the committed one was searched from the same inputs
(runtime/tree_store.py). On a machine without the GPU named, --profile-if-missing models the profile
from the GPU's datasheet (trees/roofline.py) and the tree records that it is provisional.

--variant int8|int4 (with --backend onnxruntime) runs every command on that weight-only quantized
engine (export/quantize.py): its files add the variant to the name (ppd-acceptance-int4.json,
ngram-acceptance-int4.json, latency-cpu-onnxruntime-int4.json, ppd-tree-cpu-onnxruntime-int4.json),
record it, and are refused for another variant; fp32 keeps the names above. `build` also draws the
latency curves of every variant profiled for the device (latency-<key>-<backend>-variants.png).

    python -m runtime trees roofline --gpu h200 [--compare PROFILE]
                                                   the modelled step curve (against a measured one)
    python -m runtime trees plot-latency --gpu cpu --backend onnxruntime
                                                   the latency curves of the device's engine variants
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import CheckpointError, model_fingerprint
from export.manifest import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE
from export.methods import METHODS, STATS_METHODS, TREE_SEARCH_METHODS
from export.paths import DEFAULT_MODEL_DIR
from export.ppd import PromptTokenError
from export.quantize import DEFAULT_VARIANT, VARIANTS
from runtime.acceptance import StatsConfig, method_checkpoint
from runtime.devices import cpu_isa
from runtime.prompts import PROMPTS_HELP
from runtime.ngram_acceptance import NgramStatsConfig
from runtime.backends import BACKENDS
from runtime.bench import BenchConfig
from runtime.generator import DEFAULT_MAX_NEW_TOKENS
from runtime.latency import DEFAULT_CONTEXT, DEFAULT_REPEATS
from runtime.roofline import RooflineCommand, cmd_roofline, modelled_profile
from runtime.tree_files import (check_variant_backend, find_profile, ngram_stats_filename, package_versions,
                                parse_budgets, present, run_device, search_inputs, stats_filename)
from runtime.tree_store import (INPUTS_FIELD, generated_dir, recorded_inputs_sha256, search_dirs,
                                search_inputs_sha256, tree_pictures)
from runtime.tree_sweep import reference_evaluations
from trees import PPDTreeSet, TreeError
from trees._json import write_json
from trees.atomic import write_atomic
from trees.config_args import add_config_command, config_from_args, exit_code_of, option
from trees.devices import (DeviceMismatchError, device_key, engine_label, profile_filename, tree_filename,
                           variant_latencies_filename)
from trees.latency import MEASURED, ROOFLINE, LatencyProfile, ProfileError, load_profile
from trees.search import DEFAULT_BUDGETS, AcceptanceModel, Evaluation, SearchConfig, replay, search_curve
from trees.ngram_stats import NgramStatsError, load_ngram_stats, save_ngram_stats
from trees.stats import DEFAULT_SHRINKAGE, StatsError, load_stats

PROG = "python -m runtime trees"
CHECKPOINT_HELP = "the method's checkpoint: ppd prompt tokens or ht transfer maps (default: the committed one)"
VARIANT_HELP = (f"the engine's weights: {', '.join(VARIANTS)} (a quantized variant: --backend onnxruntime, "
                f"export/quantize.py); its files are its own")
TREE_FORMAT = "ppdeploy-ppd-tree"
# Part of a tree's inputs hash: bump when the search (trees/search.py, trees/hybrid_search.py) finds
# other trees for the same inputs, so that `build` stops calling the old ones current.
TREE_SEARCH_REVISION = 2
CALIBRATION = ("ShareGPT calibration split (train/sharegpt.py: conversations with sha256 bucket 2..6, never "
               "trained on), first user turn, in file order")
CALIBRATION_PROMPTS_HELP = ("decode these prompts instead of the ShareGPT calibration split, from the workload the "
                            "trees will serve: " + PROMPTS_HELP + "; leave out the prompts `bench` evaluates on "
                            "(its --limit 20 runs the first 20)")
BACKEND_CHOICES = tuple(BACKENDS)
DEFAULT_BACKEND = StatsConfig.backend  # the reference backend
DEFAULT_METHOD = StatsConfig.method


# --- configs: one per command, mapped to argparse (defaults live here only) ------------------------

@dataclass(frozen=True)
class StatsCommand:
    model_dir: str = option(StatsConfig.model_dir, "model checkpoint dir")
    method: str = option(DEFAULT_METHOD, "graph whose slots are measured (hybrid uses ppd's)", choices=STATS_METHODS)
    checkpoint: str | None = option(StatsConfig.checkpoint, CHECKPOINT_HELP)
    backend: str = option(StatsConfig.backend, "backend that decodes", choices=BACKEND_CHOICES)
    device: str = option(StatsConfig.device, "cpu or cuda")
    variant: str = option(StatsConfig.variant, VARIANT_HELP, choices=VARIANTS)
    num_prompts: int = option(StatsConfig.num_prompts, "calibration prompts to decode")
    max_new_tokens: int = option(StatsConfig.max_new_tokens, "tokens generated per prompt")
    topk: int = option(StatsConfig.topk, "ranks recorded per prediction row")
    max_prompt_tokens: int = option(StatsConfig.max_prompt_tokens, "skip longer calibration prompts")
    prompts: str | None = option(None, CALIBRATION_PROMPTS_HELP)
    out: str | None = option(None, "output JSON (default: <method>-acceptance[-<variant>].json next to the checkpoint)")


@dataclass(frozen=True)
class NgramStatsCommand:
    model_dir: str = option(NgramStatsConfig.model_dir, "model checkpoint dir")
    backend: str = option(NgramStatsConfig.backend, "backend that decodes (greedy vanilla)", choices=tuple(BACKENDS))
    device: str = option(NgramStatsConfig.device, "cpu or cuda")
    variant: str = option(NgramStatsConfig.variant, VARIANT_HELP, choices=VARIANTS)
    num_prompts: int = option(NgramStatsConfig.num_prompts, "calibration prompts to decode")
    max_new_tokens: int = option(NgramStatsConfig.max_new_tokens, "tokens generated per prompt")
    max_depth: int = option(NgramStatsConfig.max_depth, "proposal tokens compared per position")
    max_prompt_tokens: int = option(NgramStatsConfig.max_prompt_tokens, "skip longer calibration prompts")
    prompts: str | None = option(None, CALIBRATION_PROMPTS_HELP)
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
    repeats: int = option(DEFAULT_REPEATS, "timed steps per size (median), spread over rounds")
    rounds: int = option(5, "sweeps over all sizes, so that load changes on a shared machine hit every size alike")
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


# --- shared helpers ---------------------------------------------------------------------------------

def _checkpoint(cfg) -> Path:
    return method_checkpoint(cfg.method, cfg.checkpoint)


def _stats_path(cfg) -> Path:
    return (Path(cfg.stats) if cfg.stats
            else _checkpoint(cfg).parent / stats_filename(METHODS[cfg.method].graph, cfg.variant))


def _search_inputs(cfg, profile_path: Path):
    """Statistics and profile, both checked against the model, checkpoint and engine variant loaded now."""
    return search_inputs(cfg.model_dir, _checkpoint(cfg), cfg.method, _stats_path(cfg), profile_path, cfg.variant)


def _variant_flag(cfg) -> str:
    """The --variant flag that repeats this run's variant in a suggested command ('' for fp32)."""
    return "" if cfg.variant == DEFAULT_VARIANT else f" --variant {cfg.variant}"


# --- commands ---------------------------------------------------------------------------------------

def calibration_prompts() -> list[list[dict[str, str]]]:
    """First user turns of the ShareGPT calibration split (never trained on, never an evaluation set)."""
    from train.sharegpt import chat_messages, load_sharegpt, sharegpt_split

    conversations = load_sharegpt()
    prompts = []
    for index in sharegpt_split(conversations)["calibration"]:
        first_user = next((m for m in chat_messages(conversations[index]) if m["role"] == "user"), None)
        if first_user is not None:
            prompts.append([first_user])
    return prompts


def calibration_source(prompts: str | None) -> tuple[list, str]:
    """(prompts, what they are) the statistics decode: the ShareGPT calibration split, or --prompts.
    A tree's predicted acceptance holds for text like its calibration's (README: the hybrid trees'
    n-gram part predicted within 2 % from a bench set's own statistics, 6-19 % off from ShareGPT's)."""
    if prompts is None:
        return calibration_prompts(), CALIBRATION
    from runtime.prompts import load_prompts

    items = load_prompts(prompts)
    return [item.prompt for item in items], f"--prompts {prompts} ({len(items)} prompts, first user turn, in file order)"


def cmd_stats(cfg: StatsCommand, argv: list[str]) -> int:
    """Acceptance statistics of PPD or HT on held-out ShareGPT prompts (never an evaluation set), or --prompts."""
    from runtime.acceptance import collect_acceptance

    check_variant_backend(cfg.backend, cfg.variant)
    config = StatsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StatsConfig)})
    stats = collect_acceptance(config, *calibration_source(cfg.prompts))
    out = Path(cfg.out) if cfg.out else _checkpoint(cfg).parent / stats_filename(cfg.method, cfg.variant)
    stats.save(out)
    top1, topk = stats.accuracy()
    print(f"wrote {out}: {len(stats.steps)} steps over {stats.num_prompts} prompts ({cfg.backend} {cfg.variant})")
    for d, (a, b) in enumerate(zip(top1, topk), 1):
        print(f"  depth {d}: top-1 {a:.3f}  top-{stats.topk} {b:.3f}")
    return 0


def cmd_ngram_stats(cfg: NgramStatsCommand, argv: list[str]) -> int:
    """How often the n-gram source's proposal is right, per depth, on held-out ShareGPT prompts (for hybrid), or
    --prompts."""
    from runtime.ngram_acceptance import collect_ngram_stats

    check_variant_backend(cfg.backend, cfg.variant)
    config = NgramStatsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(NgramStatsConfig)})
    sources = collect_ngram_stats(config, *calibration_source(cfg.prompts))
    out = (Path(cfg.out) if cfg.out
           else Path(METHODS["hybrid"].default_checkpoint).parent / ngram_stats_filename(cfg.variant))
    save_ngram_stats(out, sources)
    print(f"wrote {out}: {sources[0].positions} positions over {sources[0].num_prompts} prompts ({cfg.backend} "
          f"{cfg.variant})")
    for stats in sources:
        print(f"  n-grams down to {stats.min_ngram}: a proposal at {stats.match_rate:.1%} of positions; first d right: "
              + ", ".join(f"{stats.at_least(d):.3f}" for d in range(1, stats.max_depth + 1)))
    return 0


def measure_profile(cfg: ProfileCommand) -> Path:
    from transformers import AutoConfig

    from runtime.backends import make_backend
    from runtime.latency import latency_rounds
    from runtime.methods import build_method
    from trees.quiet import Quietness, load_per_core, refuse_busy_start

    check_variant_backend(cfg.backend, cfg.variant)
    device, kind, name = present(cfg.gpu, cfg.device)
    if cfg.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {cfg.max_tokens}")
    command = f"{PROG} profile --gpu {cfg.gpu} --backend {cfg.backend}{_variant_flag(cfg)}"
    refuse_busy_start("the latency profile", cfg.force, command)
    model_config = AutoConfig.from_pretrained(cfg.model_dir)
    ppd = METHODS["ppd"]
    options = {"checkpoint": cfg.checkpoint, "tree": str(ppd.hand_picked_tree)} if cfg.method == ppd.name else {}
    method = build_method(cfg.method, cfg.model_dir, model_config.vocab_size, model_config.hidden_size,
                          backend=cfg.backend, variant=cfg.variant, **options)
    backend, _ = make_backend(cfg.backend, cfg.model_dir, method, device=device,
                              max_context=max(DEFAULT_MAX_CONTEXT, cfg.context + cfg.max_tokens), variant=cfg.variant)
    if cfg.rounds < 1 or cfg.repeats < 1:
        raise ValueError("--repeats and --rounds must be >= 1")
    sizes = tuple(range(1, cfg.max_tokens + 1))
    per_round = -(-cfg.repeats // cfg.rounds)
    load_before = load_per_core()
    medians, samples = latency_rounds(backend, sizes, cfg.context, cfg.repeats, cfg.rounds)
    quiet = Quietness.measure(load_before, samples.values()).refuse_if_busy("the latency profile", cfg.force, command)
    seconds = tuple(medians[s] for s in sizes)
    key = device_key(kind, name)
    profile = LatencyProfile(device_key=key, device_name=name, backend=cfg.backend, sizes=sizes,
                             seconds=seconds, repeats=per_round * cfg.rounds, context=cfg.context,
                             model_fingerprint=model_fingerprint(cfg.model_dir),
                             versions=tuple(package_versions(cfg.backend, kind).items()), quiet=quiet,
                             variant=cfg.variant, graph_sha256=backend.info.graph_sha256,
                             cpu_isa=cpu_isa() if kind == "cpu" else None)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent / profile_filename(key, cfg.backend, cfg.variant)
    profile.save(out)
    print(f"wrote {out}: {name}, {profile.engine}: T=1 {1e3 * profile.latency(1):.1f} ms, "
          + ", ".join(f"T={t} {1e3 * profile.latency(t):.1f} ms" for t in (2, 8, 16, 32, 64) if t <= cfg.max_tokens)
          + f"; machine {quiet.summary()}")
    return out


def cmd_profile(cfg: ProfileCommand, argv: list[str]) -> int:
    """Step latency against tree size on the device present: every size 1..max, in several rounds
    over all sizes; per size the median over rounds of each round's median."""
    measure_profile(cfg)
    return 0


def cmd_build(cfg: BuildCommand, argv: list[str]) -> int:
    """Search the PPD, hybrid or HT tree set with the most expected tokens per second on a profiled device
    (and engine variant)."""
    check_variant_backend(cfg.backend, cfg.variant)
    directory = _checkpoint(cfg).parent
    profile_path = build_profile(cfg, directory)
    if cfg.stats_if_missing:
        collect_missing_stats(cfg)
    identity, stats, profile = _search_inputs(cfg, profile_path)
    config = SearchConfig(budgets=parse_budgets(cfg.budgets), topk=min(cfg.topk, stats.topk),
                          candidates_per_token=cfg.candidates_per_token, shrinkage=cfg.shrinkage)
    out = Path(cfg.out) if cfg.out else _output_dir(cfg, directory) / tree_filename(profile.device_key, cfg.backend,
                                                                                   cfg.method, cfg.variant)
    inputs = _inputs_sha256(cfg, identity, profile_path, config)
    if _current_tree(cfg, directory, out, inputs):
        return 0
    if cfg.update_committed:
        profile_path = _commit_profile(directory, profile_path, profile)
    model = AcceptanceModel.from_stats(stats, config.topk, config.shrinkage)
    start = time.perf_counter()
    result = search_curve(model, profile.latency, config, max_tokens=profile.max_tokens)
    hybrid = search_hybrid_part(cfg, model, profile, config, identity.model_fingerprint)
    print(f"searched in {time.perf_counter() - start:.1f} s")
    found = result.trees if hybrid is None else hybrid.trees
    chosen = result.evaluation if hybrid is None else hybrid.ppd
    expected = chosen if hybrid is None else hybrid      # mean_accepted, speedup, tokens_per_second
    replayed = replay(found, stats.steps)
    metadata = {
        "format": TREE_FORMAT,
        "method": cfg.method,
        "command": f"{PROG} {shlex.join(argv)}",
        "model_fingerprint": identity.model_fingerprint,
        "checkpoint_sha256": identity.checkpoint_sha256,
        "ensemble": stats.ensemble,
        "device": profile.device_name,
        **({"cpu_isa": profile.cpu_isa} if profile.cpu_isa is not None else {}),   # the CPU it was searched for
        "device_key": profile.device_key,
        "backend": profile.backend,
        "variant": profile.variant,                           # the engine whose latency and statistics these are
        "profile_source": profile.source,                     # measured, or roofline: a provisional tree
        **({"roofline": dict(profile.roofline)} if profile.source == ROOFLINE else {}),
        INPUTS_FIELD: inputs,                                 # build does nothing while this matches
        "budget": chosen.budget,
        "expected_mean_accepted": round(expected.mean_accepted, 4),
        "expected_speedup": round(expected.speedup, 4),
        "expected_tokens_per_s": round(expected.tokens_per_second, 2),
        **({} if hybrid is None else {"hybrid": {**hybrid.to_json(), "ngram_statistics": _ngram_stats_path(cfg).name}}),
        "per_m": {str(m): {"tokens": t, "expected_tokens_per_step": round(r, 4), "share_of_steps": round(o, 4),
                           "replayed_tokens_per_step": None if x is None else round(x, 4)}
                  for m, (t, r, o, x) in enumerate(zip(chosen.num_tokens, chosen.tokens_per_step, chosen.occupancy,
                                                       replayed))},
        "fixed_budgets": [{"budget": b, "expected_mean_accepted": round(e.mean_accepted, 4),
                           "expected_speedup": round(e.speedup, 4)} for b, _, e in result.curve],
        "search": {"statistics": _stats_path(cfg).name, "statistics_steps": len(stats.steps),
                   "calibration": stats.calibration, "profile": profile_path.name, **dataclasses.asdict(config)},
    }
    trees = dataclasses.replace(found, metadata=metadata)
    write_json(out, trees.to_json())
    print(f"wrote {out}")
    if profile.source == ROOFLINE:
        print(f"  provisional: searched on the roofline model of {profile.device_name} ({profile_path.name}), not a "
              f"measured profile; run `make tree GPU={cfg.gpu}` on that GPU to replace it", file=sys.stderr)
    references = reference_evaluations(cfg.method, model, profile, stats.num_prompt_tokens)
    title = f"{cfg.method} · {profile.device_name} · {profile.engine} · N={stats.num_prompt_tokens}, k={stats.ensemble}"
    print(f"  {title}")
    print(f"  chosen: budget {chosen.budget} tokens (per m: {list(chosen.num_tokens)}), expected "
          f"{expected.mean_accepted:.3f} tokens/step, {expected.speedup:.3f}x over vanilla")
    if hybrid is not None:
        print(f"  n-gram part: {hybrid.ngram_depth} tokens (n-grams down to {hybrid.min_ngram}), "
              f"{hybrid.ngram_prompt_tokens} prompt tokens each "
              f"(the PPD part alone: {hybrid.ppd.mean_accepted:.3f} tokens/step)")
    print("  per m: expected / replayed on the calibration records tokens per step: " + ", ".join(
        f"m={m} {r:.3f} / {'-' if x is None else f'{x:.3f}'}" for m, (r, x) in enumerate(zip(chosen.tokens_per_step,
                                                                                          replayed))))
    for label, e in [(f"fixed budget {b:>3}", e) for b, _, e in result.curve] + references:
        print(f"  {label}: {e.mean_accepted:.3f} tokens/step, {e.speedup:.3f}x")
    if expected.speedup < 1.0:
        print(slower_than_vanilla(cfg.method, expected.mean_accepted, expected.tokens_per_second, profile),
              file=sys.stderr)
    if cfg.plots:
        pictures = []
        if hybrid is None:   # the pictures draw PPD's search curve, not the hybrid budget split
            pictures += write_pictures(out, result, trees, model, profile, title, references)
        profiles = variant_profiles(directory, cfg.gpu, cfg.backend, {profile.variant: profile})
        if len(profiles) > 1:
            pictures.append(write_variant_latencies(profiles, out.parent / variant_latencies_filename(
                profile.device_key, profile.backend)))
        if pictures:
            print("  pictures: " + ", ".join(str(p) for p in pictures))
    return 0


def slower_than_vanilla(method: str, mean_accepted: float, tokens_per_second: float, profile: LatencyProfile) -> str:
    """What build says when the best tree it found is predicted slower than vanilla (the tree is still
    written as searched: the search does not hide it, and the figures in the file say so)."""
    vanilla, step = profile.latency(1), mean_accepted / tokens_per_second
    return (f"  SLOWER THAN VANILLA: {method}'s best tree on {profile.device_name} · {profile.engine} is predicted "
            f"at {tokens_per_second * vanilla:.2f}x vanilla: its mean step costs {1e3 * step:.1f} ms, "
            f"{step / vanilla:.2f}x vanilla's one-token step ({1e3 * vanilla:.1f} ms), for {mean_accepted:.2f} tokens "
            f"(T=2 already costs {profile.latency(2) / vanilla:.2f}x T=1 on this engine). Decode with vanilla on it; "
            f"the tree file records expected_speedup {tokens_per_second * vanilla:.3f}")


def _output_dir(cfg: BuildCommand, directory: Path) -> Path:
    """Where build writes: the committed dir with --update-committed, else this machine's generated dir."""
    return directory if cfg.update_committed else generated_dir(directory)


def _first_existing(directory: Path, name: str) -> Path:
    """`name` in the first of the generated and committed dirs that has it (else the committed path)."""
    return next((d / name for d in search_dirs(directory) if (d / name).is_file()), directory / name)


def _device_present(cfg: SearchRun) -> bool:
    try:
        present(cfg.gpu, cfg.device)
    except DeviceMismatchError:
        return False
    return True


def build_profile(cfg: BuildCommand, directory: Path) -> Path:
    """The profile build searches with: --profile; else the one for --gpu (measured before modelled,
    this machine's generated dir before the committed one); else, with --profile-if-missing, one
    measured now when the device is present, or the roofline model of that GPU when it is not (a
    measured profile always wins over a modelled one). With --profile-if-missing a measured profile of
    another graph than the engine dir holds now (engine rebuilt) is measured again."""
    if cfg.profile:
        return Path(cfg.profile)
    found = find_profile(search_dirs(directory), cfg.gpu, cfg.backend, cfg.variant)
    existing = None if found is None else load_profile(found)
    if existing is not None and not cfg.profile_if_missing:
        if _other_cpu(existing, cfg):
            print(f"warning: {found} was measured on a CPU with {existing.cpu_isa or 'no listed vector extensions'}, "
                  f"this one has {cpu_isa() or 'none listed'}: its step costs are another CPU's; pass "
                  "--profile-if-missing to measure them here", file=sys.stderr)
        return found
    if existing is not None and existing.source == MEASURED and not measured_on_another_graph(
            found, existing.graph_sha256, engine_graph_now(cfg, METHODS[ProfileCommand.method].graph)) \
            and not measured_on_another_cpu(found, existing, cfg):
        return found
    engine = engine_label(cfg.backend, cfg.variant)
    if not cfg.profile_if_missing:
        raise ProfileError(f"no {engine} latency profile for --gpu {cfg.gpu} in {generated_dir(directory)} or "
                           f"{directory}: measure one with `{PROG} profile --gpu {cfg.gpu} --backend {cfg.backend}"
                           f"{_variant_flag(cfg)}` on that device, or pass --profile-if-missing (measured here, or "
                           f"modelled for a GPU this machine does not have)")
    target = _output_dir(cfg, directory)
    if _device_present(cfg):
        _, kind, name = present(cfg.gpu, cfg.device)
        return measure_profile(ProfileCommand(gpu=cfg.gpu, backend=cfg.backend, variant=cfg.variant, device=cfg.device,
                                              model_dir=cfg.model_dir, out=str(target / profile_filename(
                                                  device_key(kind, name), cfg.backend, cfg.variant))))
    if cfg.variant != DEFAULT_VARIANT:
        raise ProfileError(f"no measured {engine} latency profile for --gpu {cfg.gpu}, and that device is not here: "
                           f"the roofline model is of {DEFAULT_VARIANT} and fp16 weights, not {cfg.variant}; measure "
                           f"it on that device (`{PROG} profile --gpu {cfg.gpu} --backend {cfg.backend}"
                           f"{_variant_flag(cfg)}`)")
    modelled = modelled_profile(cfg.gpu, cfg.backend, cfg.model_dir)
    if existing is not None and existing.to_json() == modelled.to_json():
        return found
    out = modelled.save(target / profile_filename(modelled.device_key, cfg.backend))
    print(f"no measured {cfg.backend} profile for --gpu {cfg.gpu} and no such GPU here: wrote the roofline model of "
          f"{modelled.device_name} to {out}")
    return out


def _inputs_sha256(cfg: BuildCommand, identity, profile_path: Path, config: SearchConfig) -> str:
    """The hash of everything this search reads (runtime/tree_store.py search_inputs_sha256)."""
    files = {"profile": profile_path, "statistics": _stats_path(cfg)}
    if METHODS[cfg.method].ngram_candidates:
        load_ngram_stats(_ngram_stats_path(cfg))      # a missing or bad file fails here with its fix
        files["ngram_statistics"] = _ngram_stats_path(cfg)
    return search_inputs_sha256(cfg.method, identity.model_fingerprint, identity.checkpoint_sha256, files,
                                dataclasses.asdict(config), TREE_SEARCH_REVISION)


def _current_tree(cfg: BuildCommand, directory: Path, out: Path, inputs: str) -> bool:
    """Whether a tree searched from exactly these inputs is already where it would be used (and say
    so): `out` itself, or by default the committed tree too. A generated tree of other inputs that
    would shadow a current committed one is removed."""
    generated, committed = (d / out.name for d in search_dirs(directory))
    candidates = [out] if cfg.out or cfg.update_committed else [generated, committed]
    current = next((p for p in candidates if recorded_inputs_sha256(p) == inputs), None)
    if current is None:
        return False
    if current == committed and not (cfg.out or cfg.update_committed) and generated.is_file():
        for path in (generated, *tree_pictures(generated)):
            path.unlink(missing_ok=True)
        print(f"removed {generated}: searched from other inputs, it would have been used instead of {committed}")
    print(f"{current} is current (searched from the same profile, statistics and search config; inputs sha256 "
          f"{inputs[:12]}): nothing to do")
    return True


def _commit_profile(directory: Path, profile_path: Path, profile: LatencyProfile) -> Path:
    """--update-committed: the profile the tree is searched with goes next to the checkpoint too."""
    committed = directory / profile_filename(profile.device_key, profile.backend, profile.variant)
    if profile_path.resolve() != committed.resolve():
        write_atomic(committed, profile_path.read_bytes())
        print(f"wrote {committed} (from {profile_path})")
    return committed


def _ngram_stats_path(cfg) -> Path:
    return Path(cfg.ngram_stats) if cfg.ngram_stats else _checkpoint(cfg).parent / ngram_stats_filename(cfg.variant)


def engine_graph_now(cfg, graph: str) -> str | None:
    """sha256 of the graph in the onnxruntime engine dir that measuring `graph` would load now (what
    profiles and statistics record: runtime ModelInfo.graph_sha256); None for the other backends, or
    before that dir is built."""
    if cfg.backend != "onnxruntime":
        return None
    import torch

    from export.engine import engine_dir
    from export.manifest import Manifest, ManifestError

    target = torch.device(run_device(cfg.gpu, cfg.device)).type
    try:
        return Manifest.load(engine_dir(cfg.model_dir, target, graph, cfg.variant), verify_files=False).onnx.sha256
    except (ManifestError, OSError):
        return None


def measured_on_another_graph(path: Path, recorded: str | None, now: str | None) -> bool:
    """Whether the profile or statistics at `path` were measured on another graph than the engine dir
    holds now (an engine rebuilt after a change to the exporter or the quantizer); says so. Files from
    before the field, and backends without an exported graph, count as current."""
    if recorded is None or now is None or recorded == now:
        return False
    print(f"{path} was measured on graph {recorded[:12]}, but the engine dir now holds graph {now[:12]}: "
          "measuring it again")
    return True


def _other_cpu(profile: LatencyProfile, cfg) -> bool:
    """Whether `profile` is a CPU profile recording other vector extensions than this run's CPU has
    (profiles from before the field, and GPUs', count as current)."""
    if profile.cpu_isa is None or not run_device(cfg.gpu, cfg.device).startswith("cpu"):
        return False
    return profile.cpu_isa != cpu_isa()


def measured_on_another_cpu(path: Path, profile: LatencyProfile, cfg) -> bool:
    """Whether the CPU profile at `path` was measured on a CPU with other vector extensions than this
    one (CPUs share the device key "cpu"; their kernels, and so the step costs, follow the extensions);
    says so."""
    if not _other_cpu(profile, cfg):
        return False
    print(f"{path} was measured on a CPU with {profile.cpu_isa or 'no listed vector extensions'}, this one has "
          f"{cpu_isa() or 'none listed'}: measuring it again")
    return True


def collect_missing_stats(cfg: BuildCommand) -> None:
    """--stats-if-missing: collect the statistics this search reads whose file is not there yet, or was
    measured on another graph than the engine dir holds now, on this run's model, checkpoint, backend,
    device and engine variant (the other settings: the commands' defaults); a new file replaces the old
    one only once complete. build calls it after finding or measuring the profile, so that a profile is
    timed before this decoding loads the machine."""
    device = run_device(cfg.gpu, cfg.device)
    stats = _stats_path(cfg)
    if needs_collecting(stats, load_stats(stats).graph_sha256 if stats.is_file() else None,
                        engine_graph_now(cfg, METHODS[cfg.method].graph), "statistics"):
        cmd_stats(StatsCommand(model_dir=cfg.model_dir, method=METHODS[cfg.method].graph, checkpoint=cfg.checkpoint,
                               backend=cfg.backend, device=device, variant=cfg.variant, out=str(stats)), [])
    if not METHODS[cfg.method].ngram_candidates:
        return
    ngram = _ngram_stats_path(cfg)
    if needs_collecting(ngram, load_ngram_stats(ngram)[0].graph_sha256 if ngram.is_file() else None,
                        engine_graph_now(cfg, METHODS["vanilla"].graph), "n-gram statistics"):
        cmd_ngram_stats(NgramStatsCommand(model_dir=cfg.model_dir, backend=cfg.backend, device=device,
                                          variant=cfg.variant, out=str(ngram)), [])


def needs_collecting(path: Path, recorded: str | None, now: str | None, what: str) -> bool:
    """Whether the `what` file at `path` is missing, or was measured on another graph than `now`; says which."""
    if not path.is_file():
        print(f"no {what} at {path}: collecting them")
        return True
    return measured_on_another_graph(path, recorded, now)


def search_hybrid_part(cfg, model: AcceptanceModel, profile: LatencyProfile, config: SearchConfig,
                       fingerprint: str):
    """For a method whose steps also hold n-gram candidates: the n-gram budget and the PPD trees for
    the rest (trees/hybrid_search.py); None for the others."""
    if not METHODS[cfg.method].ngram_candidates:
        return None
    from trees.hybrid_search import search_hybrid

    ngram = load_ngram_stats(_ngram_stats_path(cfg))
    stale = next((s.model_fingerprint for s in ngram if s.model_fingerprint != fingerprint), None)
    if stale is not None:
        raise NgramStatsError(f"{_ngram_stats_path(cfg)} was collected for model {stale}, not "
                              f"{fingerprint}: run `{PROG} ngram-stats` for this model")
    other = next((s.variant for s in ngram if s.variant != cfg.variant), None)
    if other is not None:
        raise NgramStatsError(f"{_ngram_stats_path(cfg)} was collected on the {other} engine, not {cfg.variant}: run "
                              f"`{PROG} ngram-stats --backend {cfg.backend}{_variant_flag(cfg)}`, or pass --ngram-stats "
                              f"of that variant")
    budget = max(b for b in config.budgets if b <= profile.max_tokens)
    return search_hybrid(model, ngram, profile.latency, budget, config)


def write_pictures(out: Path, result, trees: PPDTreeSet, model: AcceptanceModel, profile: LatencyProfile,
                   title: str, references: list[tuple[str, Evaluation]]) -> list[Path]:
    from trees.plots import plot_latency, plot_search, plot_trees

    stem, chosen = out.with_suffix(""), result.evaluation
    return [plot_latency(profile, chosen, f"{stem}-latency.png"),
            plot_search(result, f"{stem}-search.png", title, references),
            plot_trees(trees, model, chosen, f"{stem}-trees.png",
                       f"chosen trees: {chosen.mean_accepted:.2f} tokens/step, {chosen.speedup:.2f}x expected "
                       f"(budget {chosen.budget})\n{title}")]


def variant_profiles(directory: Path, gpu: str, backend: str,
                     known: dict[str, LatencyProfile] | None = None) -> list[LatencyProfile]:
    """The latency profile of each engine variant for --gpu and `backend` that has one (find_profile:
    this machine's generated dir, then the committed one), in VARIANTS order; `known` holds the
    profiles a caller already uses (build: the one it searched with), by variant."""
    known = dict(known or {})
    profiles = []
    for variant in VARIANTS:
        path = None if variant in known else find_profile(search_dirs(directory), gpu, backend, variant)
        if path is not None:
            known[variant] = load_profile(path)
            known[variant].check_variant(variant, path)
        if variant in known:
            profiles.append(known[variant])
    return profiles


def write_variant_latencies(profiles: list[LatencyProfile], out: Path) -> Path:
    from trees.plots import plot_variant_latencies

    return plot_variant_latencies(profiles, out)


@dataclass(frozen=True)
class PlotLatencyCommand:
    gpu: str = option(help="the device whose profiles are drawn: 'cpu', or part of the GPU's name")
    backend: str = option(DEFAULT_BACKEND, "backend", choices=BACKEND_CHOICES)
    checkpoint: str = option(str(METHODS["ppd"].default_checkpoint), "the checkpoint whose dir holds the profiles "
                                                                     "(and artifacts/trees/<its dir>/)")
    out: str | None = option(None, "PNG (default: latency-<device>-<backend>-variants.png in artifacts/trees/<model>/)")


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
    from runtime.bench import write_report
    from runtime.generator import Generator
    from runtime.prompts import load_prompts
    from runtime.tree_sweep import format_sweep, run_sweep, sweep_generators, sweep_rows, sweep_variants

    if METHODS[cfg.method].ngram_candidates:
        raise ValueError(f"the sweep compares PPD tree sets; for {cfg.method} measure with `python -m runtime bench "
                         f"--methods vanilla,ppd,ngram,{cfg.method}`")
    check_variant_backend(cfg.backend, cfg.variant)
    device, kind, name = present(cfg.gpu, cfg.device)
    directory, key = _checkpoint(cfg).parent, device_key(kind, name)
    tree_path = Path(cfg.tree) if cfg.tree else _first_existing(directory, tree_filename(key, cfg.backend, cfg.method,
                                                                                          cfg.variant))
    profile_path = Path(cfg.profile) if cfg.profile else _first_existing(directory, profile_filename(
        key, cfg.backend, cfg.variant))
    identity, stats, profile = _search_inputs(cfg, profile_path)
    model = AcceptanceModel.from_stats(stats, min(SearchConfig.topk, stats.topk))
    variants = sweep_variants(cfg.method, tree_path, identity, model, profile, parse_budgets(cfg.budgets),
                              cfg.variant)
    base = Generator.from_pretrained(cfg.model_dir, method=cfg.method, backend=cfg.backend, device=device,
                                     variant=cfg.variant, checkpoint=str(_checkpoint(cfg)), tree=str(tree_path))
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


@dataclass(frozen=True)
class PredictCommand:
    tree: str = option(help="a tree file as `build` wrote it (ppd, ht or hybrid)")
    stats: str = option(help="acceptance statistics of the tree's graph, e.g. `stats --prompts FILE --out ...`")
    ngram_stats: str | None = option(None, "n-gram statistics, for a hybrid tree (e.g. `ngram-stats --prompts FILE`)")


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
    """`python -m runtime trees ARGV` (runtime/__main__.py hands over everything after "trees")."""
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
