"""python -m trees: hardware-aware trees for PPD and HT (--method ppd|ht; same tree format, N = k for HT).

    python -m trees stats                          acceptance statistics on held-out ShareGPT prompts
    python -m trees profile --gpu cpu --backend onnxruntime
                                                   step latency against tree size on the present device
    python -m trees build --gpu cpu --backend onnxruntime [--profile-if-missing]
                                                   search the tree set, write it with its pictures
    python -m trees sweep --gpu cpu --backend onnxruntime --prompts mtbench
                                                   benchmark the chosen tree against fixed budgets,
                                                   the hand-picked tree and vanilla, in one run

Files live next to the method's checkpoint (checkpoints/<model>/): <method>-acceptance.json,
latency-<device key>-<backend>.json (one per device, shared by both methods: see trees/devices.py),
<method>-tree-<device key>-<backend>.json and its PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from export.checkpoint import CheckpointError, model_fingerprint
from export.manifest import DEFAULT_MAX_TREE
from export.paths import DEFAULT_MODEL_DIR
from export.ppd import DEFAULT_PPD_CHECKPOINT, PromptTokenError
from runtime.acceptance import TREE_METHODS, StatsConfig, method_checkpoint
from runtime.backends import BACKENDS
from runtime.generator import DEFAULT_MAX_NEW_TOKENS
from runtime.latency import DEFAULT_CONTEXT, DEFAULT_REPEATS
from trees import PPDTreeSet, TreeError
from trees._json import write_json
from trees.config_args import add_config_arguments
from trees.devices import DeviceMismatchError, check_device, device_key, profile_filename, tree_filename
from trees.latency import LatencyProfile, ProfileError, load_profile
from trees.search import (DEFAULT_BUDGETS, AcceptanceModel, Evaluation, SearchConfig, replay,
                          search_curve)
from trees.stats import DEFAULT_SHRINKAGE, StatsError, load_stats
from runtime.tree_sweep import reference_evaluations

CHECKPOINT_HELP = "the method's checkpoint: ppd prompt tokens or ht transfer maps (default: the committed one)"
TREE_FORMAT = "ppdeploy-ppd-tree"
CALIBRATION = ("ShareGPT calibration split (train/sharegpt.py: conversations with sha256 bucket 2..6, never "
               "trained on), first user turn, in file order")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


# --- configs: one per command, mapped to argparse (defaults live here only) ------------------------

@dataclass(frozen=True)
class StatsCommand:
    model_dir: str = field(default=str(DEFAULT_MODEL_DIR), metadata=_help("model checkpoint dir"))
    method: str = field(default="ppd", metadata=_help("method whose trees these are", choices=TREE_METHODS))
    checkpoint: str | None = field(default=None, metadata=_help(CHECKPOINT_HELP))
    backend: str = field(default="torch", metadata=_help("backend that decodes", choices=BACKENDS))
    device: str = field(default="cpu", metadata=_help("cpu or cuda"))
    num_prompts: int = field(default=StatsConfig.num_prompts, metadata=_help("calibration prompts to decode"))
    max_new_tokens: int = field(default=StatsConfig.max_new_tokens, metadata=_help("tokens generated per prompt"))
    topk: int = field(default=StatsConfig.topk, metadata=_help("ranks recorded per prediction row"))
    max_prompt_tokens: int = field(default=StatsConfig.max_prompt_tokens,
                                   metadata=_help("skip longer calibration prompts"))
    out: str | None = field(default=None, metadata=_help("output JSON (default: <method>-acceptance.json next to "
                                                          "the checkpoint)"))


@dataclass(frozen=True)
class ProfileCommand:
    gpu: str = field(metadata=_help("the device present: 'cpu', or part of the GPU's name (e.g. h100)"))
    backend: str = field(default="torch", metadata=_help("backend to time", choices=BACKENDS))
    device: str | None = field(default=None, metadata=_help("cpu or cuda (default: cpu for --gpu cpu, else cuda)"))
    model_dir: str = field(default=str(DEFAULT_MODEL_DIR), metadata=_help("model checkpoint dir"))
    checkpoint: str = field(default=str(DEFAULT_PPD_CHECKPOINT), metadata=_help("PPD prompt-token checkpoint"))
    method: str = field(default="ppd", metadata=_help("graph timed: ppd (with its prompt-token rows) or vanilla "
                                                      "(before prompt tokens exist; same cost)",
                                                      choices=("ppd", "vanilla")))
    max_tokens: int = field(default=DEFAULT_MAX_TREE, metadata=_help("largest tree timed (the engines' default "
                                                                      "max tree); every size 1..max is timed"))
    context: int = field(default=DEFAULT_CONTEXT, metadata=_help("committed cache entries while timing"))
    repeats: int = field(default=DEFAULT_REPEATS, metadata=_help("timed steps per size (median), spread over rounds"))
    rounds: int = field(default=5, metadata=_help("sweeps over all sizes, so that load changes on a shared machine "
                                                  "hit every size alike"))
    out: str | None = field(default=None, metadata=_help("output JSON (default: latency-<device>-<backend>.json "
                                                         "next to the checkpoint)"))


@dataclass(frozen=True)
class BuildCommand:
    gpu: str = field(metadata=_help("device the tree is for: 'cpu' or part of the GPU's name; matched against "
                                    "the profile's recorded device"))
    backend: str = field(default="torch", metadata=_help("backend of the latency profile", choices=BACKENDS))
    device: str | None = field(default=None, metadata=_help("for --profile-if-missing: cpu or cuda"))
    model_dir: str = field(default=str(DEFAULT_MODEL_DIR), metadata=_help("model checkpoint dir"))
    method: str = field(default="ppd", metadata=_help("method whose trees these are", choices=TREE_METHODS))
    checkpoint: str | None = field(default=None, metadata=_help(CHECKPOINT_HELP))
    stats: str | None = field(default=None, metadata=_help("acceptance statistics (default: next to the checkpoint)"))
    profile: str | None = field(default=None, metadata=_help("latency profile (default: the one next to the "
                                                             "checkpoint whose device matches --gpu)"))
    profile_if_missing: bool = field(default=False, metadata=_help("measure the profile first when there is none"))
    out: str | None = field(default=None, metadata=_help("tree JSON (default: <method>-tree-<device>-<backend>.json "
                                                         "next to the checkpoint)"))
    budgets: str = field(default=",".join(map(str, DEFAULT_BUDGETS)),
                         metadata=_help("fixed budgets of the curve; the largest caps the chosen tree"))
    topk: int = field(default=SearchConfig.topk, metadata=_help("ranks considered per depth"))
    shrinkage: float = field(default=DEFAULT_SHRINKAGE, metadata=_help("pseudo-counts pulling per-m statistics "
                                                                       "towards the pooled ones"))
    candidates_per_token: int = field(default=SearchConfig.candidates_per_token,
                                      metadata=_help("candidate paths per token of budget"))
    plots: bool = field(default=True, metadata=_help("write the PNGs next to the tree"))


@dataclass(frozen=True)
class SweepCommand:
    gpu: str = field(metadata=_help("the device present: 'cpu' or part of the GPU's name"))
    backend: str = field(default="torch", metadata=_help("backend", choices=BACKENDS))
    device: str | None = field(default=None, metadata=_help("cpu or cuda (default: from --gpu)"))
    model_dir: str = field(default=str(DEFAULT_MODEL_DIR), metadata=_help("model checkpoint dir"))
    method: str = field(default="ppd", metadata=_help("method whose trees these are", choices=TREE_METHODS))
    checkpoint: str | None = field(default=None, metadata=_help(CHECKPOINT_HELP))
    tree: str | None = field(default=None, metadata=_help("the chosen tree (default: this device's searched tree)"))
    stats: str | None = field(default=None, metadata=_help("acceptance statistics (default: next to the checkpoint)"))
    profile: str | None = field(default=None, metadata=_help("latency profile (default: this device's)"))
    budgets: str = field(default="4,8,16,32,64", metadata=_help("fixed budgets compared with the chosen tree"))
    prompts: str = field(default="mtbench", metadata=_help("mtbench, humaneval, or a JSONL of {id, prompt}"))
    limit: int | None = field(default=None, metadata=_help("first N prompts only"))
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata=_help("new tokens per prompt"))
    repeats: int = field(default=1, metadata=_help("timed repeats (interleaved; medians reported)"))
    out: str | None = field(default=None, metadata=_help("write the report JSON here"))


# --- shared helpers ---------------------------------------------------------------------------------

def _device(gpu: str, device: str | None) -> str:
    return device or ("cpu" if gpu.strip().lower() == "cpu" else "cuda")


def _present(gpu: str, device: str | None) -> tuple[str, str, str]:
    """(device, type, real name) of the device this run uses, checked against --gpu."""
    from runtime.devices import present_device

    device = _device(gpu, device)
    try:
        kind, name = present_device(device)
    except DeviceMismatchError as exc:
        raise DeviceMismatchError(f"--gpu {gpu}: {exc}") from exc
    check_device(gpu, kind, name)
    return device, kind, name


def _checkpoint(cfg) -> Path:
    return method_checkpoint(cfg.method, cfg.checkpoint)


def stats_filename(method: str) -> str:
    return f"{method}-acceptance.json"


def _stats_path(cfg) -> Path:
    return Path(cfg.stats) if cfg.stats else _checkpoint(cfg).parent / stats_filename(cfg.method)


def _budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError as exc:
        raise ValueError(f"budgets must be a comma list of token counts, got {text!r}") from exc
    if not budgets:
        raise ValueError("give at least one budget")
    return budgets


def _versions(backend: str, device_type: str) -> dict[str, str]:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("numpy", "transformers", *(("onnxruntime",) if backend == "onnxruntime" else ())):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device_type == "cuda":
        versions["cuda"] = str(torch.version.cuda)
    return versions


def find_profile(directory: Path, gpu: str, backend: str) -> Path | None:
    """The profile next to the checkpoint for `backend` whose recorded device matches --gpu."""
    matches = []
    for path in sorted(directory.glob(profile_filename("*", backend))):
        profile = load_profile(path)
        kind = "cpu" if profile.device_key == "cpu" else "cuda"
        try:
            check_device(gpu, kind, profile.device_name)
        except DeviceMismatchError:
            continue
        matches.append(path)
    if len(matches) > 1:
        raise ProfileError(f"--gpu {gpu} matches several profiles ({', '.join(p.name for p in matches)}): "
                           f"name the GPU more precisely or pass --profile")
    return matches[0] if matches else None


def _identity(cfg):
    from runtime.acceptance import checkpoint_identity

    return checkpoint_identity(cfg.model_dir, _checkpoint(cfg), cfg.method)


def _search_inputs(cfg, profile_path: Path):
    """Statistics and profile, both checked against the model and checkpoint loaded now."""
    identity = _identity(cfg)
    stats = load_stats(_stats_path(cfg))
    stats.check_identity(identity.model_fingerprint, identity.checkpoint_sha256)
    profile = load_profile(profile_path)
    if profile.model_fingerprint != identity.model_fingerprint:
        raise ProfileError(f"{profile_path} was measured for model {profile.model_fingerprint}, not "
                           f"{identity.model_fingerprint}: re-measure it with `python -m trees profile`")
    return identity, stats, profile


# --- commands ---------------------------------------------------------------------------------------

def cmd_stats(cfg: StatsCommand) -> int:
    """Acceptance statistics of PPD or HT on held-out ShareGPT prompts (never an evaluation set)."""
    from runtime.acceptance import collect_acceptance
    from train.sharegpt import chat_messages, load_sharegpt, sharegpt_split

    conversations = load_sharegpt()
    prompts = []
    for index in sharegpt_split(conversations)["calibration"]:
        first_user = next((m for m in chat_messages(conversations[index]) if m["role"] == "user"), None)
        if first_user is not None:
            prompts.append([first_user])
    config = StatsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StatsConfig)})
    stats = collect_acceptance(config, prompts, CALIBRATION)
    out = Path(cfg.out) if cfg.out else _checkpoint(cfg).parent / stats_filename(cfg.method)
    stats.save(out)
    top1, topk = stats.accuracy()
    print(f"wrote {out}: {len(stats.steps)} steps over {stats.num_prompts} prompts")
    for d, (a, b) in enumerate(zip(top1, topk), 1):
        print(f"  depth {d}: top-1 {a:.3f}  top-{stats.topk} {b:.3f}")
    return 0


def measure_profile(cfg: ProfileCommand) -> Path:
    from transformers import AutoConfig

    from runtime.backends import make_backend
    from runtime.latency import profile_step_latency
    from runtime.methods import DEFAULT_PPD_TREE, build_method

    device, kind, name = _present(cfg.gpu, cfg.device)
    if cfg.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {cfg.max_tokens}")
    model_config = AutoConfig.from_pretrained(cfg.model_dir)
    options = {"checkpoint": cfg.checkpoint, "tree": str(DEFAULT_PPD_TREE)} if cfg.method == "ppd" else {}
    method = build_method(cfg.method, cfg.model_dir, model_config.vocab_size, model_config.hidden_size, **options)
    backend, _ = make_backend(cfg.backend, cfg.model_dir, method, device=device,
                              max_context=max(2048, cfg.context + cfg.max_tokens))
    if cfg.rounds < 1 or cfg.repeats < 1:
        raise ValueError("--repeats and --rounds must be >= 1")
    sizes = tuple(range(1, cfg.max_tokens + 1))
    per_round = -(-cfg.repeats // cfg.rounds)
    rounds = [profile_step_latency(backend, sizes=sizes, context=cfg.context, repeats=per_round,
                                   warmup=3 if r == 0 else 1, show_progress=r == 0) for r in range(cfg.rounds)]
    seconds = tuple(statistics.median(medians[s] for medians in rounds) for s in sizes)
    key = device_key(kind, name)
    profile = LatencyProfile(device_key=key, device_name=name, backend=cfg.backend, sizes=sizes,
                             seconds=seconds, repeats=per_round * cfg.rounds, context=cfg.context,
                             model_fingerprint=model_fingerprint(cfg.model_dir),
                             versions=tuple(_versions(cfg.backend, kind).items()))
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent / profile_filename(key, cfg.backend)
    profile.save(out)
    print(f"wrote {out}: {name}, {cfg.backend}: T=1 {1e3 * profile.latency(1):.1f} ms, "
          + ", ".join(f"T={t} {1e3 * profile.latency(t):.1f} ms" for t in (8, 16, 32, 64) if t <= cfg.max_tokens))
    return out


def cmd_profile(cfg: ProfileCommand) -> int:
    """Step latency against tree size on the device present: every size 1..max, in several rounds
    over all sizes; per size the median over rounds of each round's median."""
    measure_profile(cfg)
    return 0


def cmd_build(cfg: BuildCommand, argv: list[str]) -> int:
    """Search the PPD or HT tree set with the most expected tokens per second on a profiled device."""
    directory = _checkpoint(cfg).parent
    profile_path = Path(cfg.profile) if cfg.profile else find_profile(directory, cfg.gpu, cfg.backend)
    if profile_path is None:
        if not cfg.profile_if_missing:
            raise ProfileError(f"no {cfg.backend} latency profile for --gpu {cfg.gpu} in {directory}: measure one "
                               f"with `python -m trees profile --gpu {cfg.gpu} --backend {cfg.backend}` on that "
                               f"device, or pass --profile-if-missing")
        profile_path = measure_profile(ProfileCommand(gpu=cfg.gpu, backend=cfg.backend, device=cfg.device,
                                                      model_dir=cfg.model_dir))
    identity, stats, profile = _search_inputs(cfg, profile_path)
    config = SearchConfig(budgets=_budgets(cfg.budgets), topk=min(cfg.topk, stats.topk),
                          candidates_per_token=cfg.candidates_per_token, shrinkage=cfg.shrinkage)
    model = AcceptanceModel.from_stats(stats, config.topk, config.shrinkage)
    start = time.perf_counter()
    result = search_curve(model, profile.latency, config, max_tokens=profile.max_tokens)
    print(f"searched in {time.perf_counter() - start:.1f} s")
    chosen = result.evaluation
    replayed = replay(result.trees, stats.steps)
    metadata = {
        "format": TREE_FORMAT,
        "method": cfg.method,
        "command": "python -m trees " + shlex.join(argv),
        "model_fingerprint": identity.model_fingerprint,
        "checkpoint_sha256": identity.checkpoint_sha256,
        "ensemble": stats.ensemble,
        "device": profile.device_name,
        "device_key": profile.device_key,
        "backend": profile.backend,
        "budget": chosen.budget,
        "expected_mean_accepted": round(chosen.mean_accepted, 4),
        "expected_speedup": round(chosen.speedup, 4),
        "expected_tokens_per_s": round(chosen.tokens_per_second, 2),
        "per_m": {str(m): {"tokens": t, "expected_tokens_per_step": round(r, 4), "share_of_steps": round(o, 4),
                           "replayed_tokens_per_step": None if x is None else round(x, 4)}
                  for m, (t, r, o, x) in enumerate(zip(chosen.num_tokens, chosen.tokens_per_step, chosen.occupancy,
                                                       replayed))},
        "fixed_budgets": [{"budget": b, "expected_mean_accepted": round(e.mean_accepted, 4),
                           "expected_speedup": round(e.speedup, 4)} for b, _, e in result.curve],
        "search": {"statistics": _stats_path(cfg).name, "statistics_steps": len(stats.steps),
                   "calibration": stats.calibration, "profile": profile_path.name, **dataclasses.asdict(config)},
    }
    trees = dataclasses.replace(result.trees, metadata=metadata)
    out = Path(cfg.out) if cfg.out else directory / tree_filename(profile.device_key, cfg.backend, cfg.method)
    write_json(out, trees.to_json())
    print(f"wrote {out}")
    references = reference_evaluations(cfg.method, model, profile, stats.num_prompt_tokens)
    title = f"{cfg.method} · {profile.device_name} · {profile.backend} · N={stats.num_prompt_tokens}, k={stats.ensemble}"
    print(f"  {title}")
    print(f"  chosen: budget {chosen.budget} tokens (per m: {list(chosen.num_tokens)}), expected "
          f"{chosen.mean_accepted:.3f} tokens/step, {chosen.speedup:.3f}x over vanilla")
    print("  per m: expected / replayed on the calibration records tokens per step: " + ", ".join(
        f"m={m} {r:.3f} / {'-' if x is None else f'{x:.3f}'}" for m, (r, x) in enumerate(zip(chosen.tokens_per_step,
                                                                                          replayed))))
    for label, e in [(f"fixed budget {b:>3}", e) for b, _, e in result.curve] + references:
        print(f"  {label}: {e.mean_accepted:.3f} tokens/step, {e.speedup:.3f}x")
    if chosen.speedup < 1.0:
        print(f"  warning: {cfg.method} is predicted to be slower than vanilla on {profile.device_name} with "
              f"{profile.backend}",
              file=sys.stderr)
    if cfg.plots:
        pictures = write_pictures(out, result, trees, model, profile, title, references)
        print("  pictures: " + ", ".join(str(p) for p in pictures))
    return 0


def write_pictures(out: Path, result, trees: PPDTreeSet, model: AcceptanceModel, profile: LatencyProfile,
                   title: str, references: list[tuple[str, Evaluation]]) -> list[Path]:
    from trees.plots import plot_latency, plot_search, plot_trees

    stem, chosen = out.with_suffix(""), result.evaluation
    return [plot_latency(profile, chosen, f"{stem}-latency.png"),
            plot_search(result, f"{stem}-search.png", title, references),
            plot_trees(trees, model, chosen, f"{stem}-trees.png",
                       f"chosen trees: {chosen.mean_accepted:.2f} tokens/step, {chosen.speedup:.2f}x expected "
                       f"(budget {chosen.budget})\n{title}")]


def cmd_sweep(cfg: SweepCommand) -> int:
    """Measured tokens/s and accepted tokens of the chosen tree, the best tree of each fixed budget,
    the hand-picked tree and vanilla, on one backend in one run (repeats interleaved)."""
    from runtime.bench import write_report
    from runtime.generator import Generator
    from runtime.prompts import load_prompts
    from runtime.tree_sweep import format_sweep, run_sweep, sweep_generators, sweep_rows, sweep_variants

    device, kind, name = _present(cfg.gpu, cfg.device)
    directory, key = _checkpoint(cfg).parent, device_key(kind, name)
    tree_path = Path(cfg.tree) if cfg.tree else directory / tree_filename(key, cfg.backend, cfg.method)
    profile_path = Path(cfg.profile) if cfg.profile else directory / profile_filename(key, cfg.backend)
    identity, stats, profile = _search_inputs(cfg, profile_path)
    model = AcceptanceModel.from_stats(stats, min(SearchConfig.topk, stats.topk))
    variants = sweep_variants(cfg.method, tree_path, identity, model, profile, _budgets(cfg.budgets))
    base = Generator.from_pretrained(cfg.model_dir, method=cfg.method, backend=cfg.backend, device=device,
                                     checkpoint=str(_checkpoint(cfg)), tree=str(tree_path))
    generators = sweep_generators(base, identity.config, variants)
    items = load_prompts(cfg.prompts, cfg.limit)
    encoded = [base.encode(item.prompt) for item in items]
    runs = run_sweep(generators, encoded, cfg.max_new_tokens, cfg.repeats)
    rows = sweep_rows(runs, variants, model, profile, identity.config.ensemble)
    print(f"{cfg.prompts} x {len(items)} prompts, {cfg.max_new_tokens} new tokens, {cfg.backend} on {name}, "
          f"median of {cfg.repeats} repeat(s); accepted = tokens per decode step (prefill left out)")
    print(format_sweep(rows, len(items)))
    if cfg.out:
        write_report({"prompts": cfg.prompts, "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens,
                      "backend": cfg.backend, "device": name, "repeats": cfg.repeats, "rows": rows}, cfg.out)
        print(f"wrote {cfg.out}")
    return 0 if all(r["matches_vanilla"] == len(items) for r in rows) else 1


# --- argparse -------------------------------------------------------------------------------------

COMMANDS = {"stats": StatsCommand, "profile": ProfileCommand, "build": BuildCommand, "sweep": SweepCommand}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m trees", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {"stats": cmd_stats, "profile": cmd_profile, "build": cmd_build, "sweep": cmd_sweep}
    for name, cls in COMMANDS.items():
        doc = handlers[name].__doc__
        add_config_arguments(sub.add_parser(name, help=doc, description=doc), cls)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    config = COMMANDS[command](**args)
    try:
        if command == "build":
            return cmd_build(config, argv)
        return handlers[command](config)
    except (CheckpointError, PromptTokenError, DeviceMismatchError, ProfileError, StatsError, TreeError,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
