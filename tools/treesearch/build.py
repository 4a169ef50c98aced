"""`python -m tools trees build`: the tree search on its measured (or modelled) inputs, with what makes
them current first: the profile (found, measured again on another graph or CPU, or modelled for an absent
GPU), the statistics (--stats-if-missing), and a tree already searched from the same inputs (nothing to do)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from export.methods import METHODS
from export.quantize import DEFAULT_VARIANT, VARIANTS
from export.devices import cpu_isa
from tools.treesearch.roofline import modelled_profile
from tools.treesearch.commands import (PROG, BuildCommand, NgramStatsCommand, ProfileCommand, SearchRun, StatsCommand,
                                   checkpoint_path, load_search_inputs, ngram_stats_path, stats_path, variant_flag)
from tools.treesearch.measure import cmd_ngram_stats, cmd_stats, measure_profile
from tools.treesearch.files import check_variant_backend, find_profile, parse_budgets, present, run_device
from export.tree_store import (INPUTS_FIELD, generated_dir, recorded_inputs_sha256, search_dirs,
                                search_inputs_sha256, tree_pictures)
from tools.treesearch.batch import format_batches, search_batches
from tools.treesearch.sweep import reference_evaluations
from trees import PPDTreeSet
from trees.ppd_tree import BATCH_FIELD
from trees._json import write_json
from trees.atomic import write_atomic
from trees.devices import (DeviceMismatchError, device_key, engine_label, profile_filename, tree_filename,
                           variant_latencies_filename)
from trees.latency import MEASURED, ROOFLINE, LatencyProfile, ProfileError, load_profile
from trees.search import AcceptanceModel, Evaluation, SearchConfig, replay, search_curve
from trees.ngram_stats import NgramStatsError, load_ngram_stats
from trees.stats import load_stats


TREE_FORMAT = "ppdeploy-ppd-tree"
# Part of a tree's inputs hash: bump when the search (trees/search.py, trees/hybrid_search.py) finds
# other trees for the same inputs, so that `build` stops calling the old ones current.
TREE_SEARCH_REVISION = 3      # 3: trees per batch size (tools/treesearch/batch.py)


def cmd_build(cfg: BuildCommand, argv: list[str]) -> int:
    """Search the PPD, hybrid or HT tree set with the most expected tokens per second on a profiled device
    (and engine variant)."""
    check_variant_backend(cfg.backend, cfg.variant)
    directory = checkpoint_path(cfg).parent
    profile_path = build_profile(cfg, directory)
    if cfg.stats_if_missing:
        collect_missing_stats(cfg)
    identity, stats, profile = load_search_inputs(cfg, profile_path)
    config = SearchConfig(budgets=parse_budgets(cfg.budgets), topk=min(cfg.topk, stats.topk),
                          candidates_per_token=cfg.candidates_per_token, shrinkage=cfg.shrinkage,
                          min_batch_speedup=cfg.min_batch_speedup)
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
    hybrid_search = hybrid_searcher(cfg, model, config, identity.model_fingerprint)
    hybrid = None if hybrid_search is None else hybrid_search(
        profile.latency, max(b for b in config.budgets if b <= profile.max_tokens))
    batches = search_batches(model, profile, config, hybrid_search)
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
        **({} if hybrid is None else {"hybrid": {**hybrid.to_json(), "ngram_statistics": ngram_stats_path(cfg).name}}),
        BATCH_FIELD: batches,                                 # per batch size B: its trees, or null (vanilla)
        "per_m": {str(m): {"tokens": t, "expected_tokens_per_step": round(r, 4), "share_of_steps": round(o, 4),
                           "replayed_tokens_per_step": None if x is None else round(x, 4)}
                  for m, (t, r, o, x) in enumerate(zip(chosen.num_tokens, chosen.tokens_per_step, chosen.occupancy,
                                                       replayed))},
        "fixed_budgets": [{"budget": b, "expected_mean_accepted": round(e.mean_accepted, 4),
                           "expected_speedup": round(e.speedup, 4)} for b, _, e in result.curve],
        "search": {"statistics": stats_path(cfg).name, "statistics_steps": len(stats.steps),
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
    if batches:
        print(f"  per batch size (over vanilla at that B): {format_batches(batches)}")
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
                           f"{variant_flag(cfg)}` on that device, or pass --profile-if-missing (measured here, or "
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
                           f"{variant_flag(cfg)}`)")
    modelled = modelled_profile(cfg.gpu, cfg.backend, cfg.model_dir)
    if existing is not None and existing.to_json() == modelled.to_json():
        return found
    out = modelled.save(target / profile_filename(modelled.device_key, cfg.backend))
    print(f"no measured {cfg.backend} profile for --gpu {cfg.gpu} and no such GPU here: wrote the roofline model of "
          f"{modelled.device_name} to {out}")
    return out


def _inputs_sha256(cfg: BuildCommand, identity, profile_path: Path, config: SearchConfig) -> str:
    """The hash of everything this search reads (export/tree_store.py search_inputs_sha256)."""
    files = {"profile": profile_path, "statistics": stats_path(cfg)}
    if METHODS[cfg.method].ngram_candidates:
        load_ngram_stats(ngram_stats_path(cfg))      # a missing or bad file fails here with its fix
        files["ngram_statistics"] = ngram_stats_path(cfg)
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
    stats = stats_path(cfg)
    if needs_collecting(stats, load_stats(stats).graph_sha256 if stats.is_file() else None,
                        engine_graph_now(cfg, METHODS[cfg.method].graph), "statistics"):
        cmd_stats(StatsCommand(model_dir=cfg.model_dir, method=METHODS[cfg.method].graph, checkpoint=cfg.checkpoint,
                               backend=cfg.backend, device=device, variant=cfg.variant, out=str(stats)), [])
    if not METHODS[cfg.method].ngram_candidates:
        return
    ngram = ngram_stats_path(cfg)
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


def hybrid_searcher(cfg, model: AcceptanceModel, config: SearchConfig, fingerprint: str):
    """For a method whose steps also hold n-gram candidates: (latency, budget) -> the n-gram budget and
    the PPD trees for the rest (trees/hybrid_search.py); None for the others."""
    if not METHODS[cfg.method].ngram_candidates:
        return None
    from trees.hybrid_search import search_hybrid

    ngram = load_ngram_stats(ngram_stats_path(cfg))
    stale = next((s.model_fingerprint for s in ngram if s.model_fingerprint != fingerprint), None)
    if stale is not None:
        raise NgramStatsError(f"{ngram_stats_path(cfg)} was collected for model {stale}, not "
                              f"{fingerprint}: run `{PROG} ngram-stats` for this model")
    other = next((s.variant for s in ngram if s.variant != cfg.variant), None)
    if other is not None:
        raise NgramStatsError(f"{ngram_stats_path(cfg)} was collected on the {other} engine, not {cfg.variant}: run "
                              f"`{PROG} ngram-stats --backend {cfg.backend}{variant_flag(cfg)}`, or pass --ngram-stats "
                              f"of that variant")
    return lambda latency, budget: search_hybrid(model, ngram, latency, budget, config)


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
