"""What `python -m tools trees` measures before a search: acceptance statistics (`stats`), the n-gram
source's hit rates (`ngram-stats`), both on held-out calibration prompts, and step latency against tree
size on the device present (`profile`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from export.checkpoint import model_fingerprint
from export.manifest import DEFAULT_MAX_CONTEXT
from export.methods import METHODS
from tools.treesearch.acceptance import StatsConfig
from export.devices import cpu_isa
from tools.treesearch.ngram_acceptance import NgramStatsConfig
from tools.treesearch.commands import (PROG, NgramStatsCommand, ProfileCommand, StatsCommand, checkpoint_path,
                                   variant_flag)
from tools.treesearch.files import (check_variant_backend, ngram_stats_filename, package_versions, parse_int_list,
                                present, stats_filename)
from trees.devices import device_key, profile_filename
from trees.latency import LatencyProfile
from trees.ngram_stats import save_ngram_stats


CALIBRATION = ("ShareGPT calibration split (train/sharegpt.py: conversations with sha256 bucket 2..6, never "
               "trained on), first user turn, in file order")


def calibration_prompts() -> list[str]:
    """First user turns of the ShareGPT calibration split (never trained on, never an evaluation set), as
    strings: one user turn through the chat template, or the raw text for a base model (runtime/prompting.py)."""
    from train.sharegpt import chat_messages, load_sharegpt, sharegpt_split

    conversations = load_sharegpt()
    prompts = []
    for index in sharegpt_split(conversations)["calibration"]:
        first_user = next((m for m in chat_messages(conversations[index]) if m["role"] == "user"), None)
        if first_user is not None:
            prompts.append(first_user["content"])
    return prompts


def calibration_source(prompts: str | None) -> tuple[list, str]:
    """(prompts, what they are) the statistics decode: the ShareGPT calibration split, or --prompts.
    A tree's predicted acceptance holds for text like its calibration's (README: the hybrid trees'
    n-gram part predicted within 2 % from a bench set's own statistics, 6-19 % off from ShareGPT's)."""
    if prompts is None:
        return calibration_prompts(), CALIBRATION
    from tools.bench.prompts import load_prompts

    items = load_prompts(prompts)
    return [item.prompt for item in items], f"--prompts {prompts} ({len(items)} prompts, {prompt_order(prompts)})"


def prompt_order(spec: str) -> str:
    """How a --prompts spec orders its prompts, for the calibration record (tools/bench/prompts.py load_prompts)."""
    if "+" in spec and not Path(spec).is_file():
        return "first user turn, its + parts interleaved"
    return "first user turn, in file order"


def cmd_stats(cfg: StatsCommand, argv: list[str]) -> int:
    """Acceptance statistics of PPD or HT on held-out ShareGPT prompts (never an evaluation set), or --prompts."""
    from tools.treesearch.acceptance import collect_acceptance

    check_variant_backend(cfg.backend, cfg.variant)
    config = StatsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StatsConfig)})
    stats = collect_acceptance(config, *calibration_source(cfg.prompts))
    out = Path(cfg.out) if cfg.out else checkpoint_path(cfg).parent / stats_filename(cfg.method, cfg.variant)
    stats.save(out)
    top1, topk = stats.accuracy()
    print(f"wrote {out}: {len(stats.steps)} steps over {stats.num_prompts} prompts ({cfg.backend} {cfg.variant})")
    for d, (a, b) in enumerate(zip(top1, topk), 1):
        print(f"  depth {d}: top-1 {a:.3f}  top-{stats.topk} {b:.3f}")
    return 0


def cmd_ngram_stats(cfg: NgramStatsCommand, argv: list[str]) -> int:
    """How often the n-gram source's proposal is right, per depth, on held-out ShareGPT prompts (for hybrid), or
    --prompts."""
    from tools.treesearch.ngram_acceptance import collect_ngram_stats

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

    from runtime.loading import load_pretrained
    import statistics

    from tqdm import tqdm

    from tools.latency.profile import batch_latency_samples, latency_rounds, profile_static_steps
    from runtime.methods import build_method
    from trees.quiet import Quietness, load_per_core, refuse_busy_start

    check_variant_backend(cfg.backend, cfg.variant)
    device, kind, name = present(cfg.gpu, cfg.device)
    if cfg.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {cfg.max_tokens}")
    batch_sizes = parse_int_list(cfg.batch_sizes, f"--batch-sizes takes a comma list of integers, got "
                                 f"{cfg.batch_sizes!r}", "") if cfg.batch_sizes else ()
    if any(b < 2 for b in batch_sizes):
        raise ValueError(f"--batch-sizes are B > 1 (B = 1 is the profile itself), got {list(batch_sizes)}")
    command = f"{PROG} profile --gpu {cfg.gpu} --backend {cfg.backend}{variant_flag(cfg)}"
    refuse_busy_start("the latency profile", cfg.force, command)
    model_config = AutoConfig.from_pretrained(cfg.model_dir)
    ppd = METHODS["ppd"]
    options = {"checkpoint": cfg.checkpoint, "tree": str(ppd.hand_picked_tree)} if cfg.method == ppd.name else {}
    method = build_method(cfg.method, cfg.model_dir, model_config.vocab_size, model_config.hidden_size,
                          backend=cfg.backend, variant=cfg.variant, **options)
    sizes = tuple(range(1, cfg.max_tokens + 1))
    # Batched steps (B x T <= max_tokens) are among `sizes`; each static step binds all B x max_context cells
    backend, _ = load_pretrained(cfg.backend, cfg.model_dir, method, device=device,
                                 max_context=max(DEFAULT_MAX_CONTEXT, cfg.context + cfg.max_tokens), variant=cfg.variant,
                                 max_batch=max(batch_sizes, default=1), dtype=cfg.dtype,
                                 static_steps=profile_static_steps(device, sizes, cfg.context))
    if cfg.rounds < 1 or cfg.repeats < 1:
        raise ValueError("--repeats and --rounds must be >= 1")
    per_round = -(-cfg.repeats // cfg.rounds)
    load_before = load_per_core()
    medians, samples = latency_rounds(backend, sizes, cfg.context, cfg.repeats, cfg.rounds)
    batch = []
    for b in tqdm(batch_sizes, desc="batched steps", disable=not batch_sizes):
        per_sequence = tuple(s for s in sizes if b * s <= cfg.max_tokens)
        timed = batch_latency_samples(backend, b, per_sequence, cfg.context, cfg.repeats)
        batch.append((b, tuple(statistics.median(timed[s]) for s in per_sequence)))
        samples.update({(b, s): times for s, times in timed.items()})
    quiet = Quietness.measure(load_before, samples.values()).refuse_if_busy("the latency profile", cfg.force, command)
    seconds = tuple(medians[s] for s in sizes)
    key = device_key(kind, name)
    profile = LatencyProfile(device_key=key, device_name=name, backend=cfg.backend, sizes=sizes,
                             seconds=seconds, repeats=per_round * cfg.rounds, context=cfg.context,
                             model_fingerprint=model_fingerprint(cfg.model_dir),
                             versions=tuple(package_versions(cfg.backend, kind).items()), quiet=quiet,
                             variant=cfg.variant, graph_sha256=backend.info.graph_sha256,
                             cpu_isa=cpu_isa() if kind == "cpu" else None, batch=tuple(batch), dtype=cfg.dtype,
                             static_steps=backend.info.step_sizes is not None)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent / profile_filename(key, cfg.backend, cfg.variant)
    profile.save(out)
    print(f"wrote {out}: {name}, {profile.engine}: T=1 {1e3 * profile.latency(1):.1f} ms, "
          + ", ".join(f"T={t} {1e3 * profile.latency(t):.1f} ms" for t in (2, 8, 16, 32, 64) if t <= cfg.max_tokens)
          + "".join(f"; B={b}: T=1 {1e3 * times[0]:.1f} ms" for b, times in profile.batch)
          + f"; machine {quiet.summary()}")
    return out


def cmd_profile(cfg: ProfileCommand, argv: list[str]) -> int:
    """Step latency against tree size on the device present: every size 1..max, in several rounds
    over all sizes; per size the median over rounds of each round's median."""
    measure_profile(cfg)
    return 0
