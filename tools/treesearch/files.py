"""The inputs of the tree search for `python -m tools trees` (tools/treesearch/cli.py): the device
present checked against --gpu, the statistics and latency profile next to the method's checkpoint,
and the check that both were made for the model, checkpoint and engine variant loaded now."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Sequence
from pathlib import Path

from tools.treesearch.acceptance import CheckpointIdentity, checkpoint_identity
from trees.devices import DEFAULT_VARIANT, DeviceMismatchError, check_device, profile_filename, variant_suffix
from trees.latency import MEASURED, ROOFLINE, LatencyProfile, ProfileError, load_profile
from trees.stats import AcceptanceStats, load_stats


def run_device(gpu: str, device: str | None) -> str:
    """--device, or the one --gpu implies (cpu for 'cpu', else cuda)."""
    return device or ("cpu" if gpu.strip().lower() == "cpu" else "cuda")


def present(gpu: str, device: str | None) -> tuple[str, str, str]:
    """(device, type, real name) of the device this run uses, checked against --gpu."""
    from export.devices import present_device

    device = run_device(gpu, device)
    try:
        kind, name = present_device(device)
    except DeviceMismatchError as exc:
        raise DeviceMismatchError(f"--gpu {gpu}: {exc}") from exc
    check_device(gpu, kind, name)
    return device, kind, name


# The backend whose engines come in weight-only quantized variants (export/quantize.py: MatMulNBits).
QUANTIZED_BACKEND = "onnxruntime"


def check_variant_backend(backend: str, variant: str) -> None:
    """--variant other than fp32 names a quantized onnxruntime engine: refused for the other backends,
    before anything is loaded."""
    if variant != DEFAULT_VARIANT and backend != QUANTIZED_BACKEND:
        raise ValueError(f"--variant {variant} is a weight-only quantized {QUANTIZED_BACKEND} engine "
                         f"(export/quantize.py); the {backend} backend runs {DEFAULT_VARIANT} weights only: add "
                         f"--backend {QUANTIZED_BACKEND}, or leave --variant at {DEFAULT_VARIANT}")


def stats_filename(method: str, variant: str = DEFAULT_VARIANT) -> str:
    """<graph>-acceptance[-<variant>].json: acceptance statistics of ppd or ht on one engine variant."""
    return f"{method}-acceptance{variant_suffix(variant)}.json"


def ngram_stats_filename(variant: str = DEFAULT_VARIANT) -> str:
    """ngram-acceptance[-<variant>].json: the n-gram source's statistics on one engine variant."""
    return f"ngram-acceptance{variant_suffix(variant)}.json"


def parse_int_list(text: str, not_integers: str, empty: str) -> tuple[int, ...]:
    """A comma list of integers ("4,8,16"), sorted and deduplicated; `not_integers` and `empty` are the
    errors' messages (each flag names itself and its fix)."""
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError as exc:
        raise ValueError(not_integers) from exc
    if not values:
        raise ValueError(empty)
    return values


def parse_budgets(text: str) -> tuple[int, ...]:
    """A comma list of token counts ("4,8,16"), sorted and deduplicated."""
    return parse_int_list(text, f"budgets must be a comma list of token counts, got {text!r}", "give at least one budget")


def package_versions(backend: str, device_type: str) -> dict[str, str]:
    """Versions a latency profile records: python, torch, numpy, transformers (+ onnxruntime, cuda)."""
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


def find_profile(directories: Path | Sequence[Path], gpu: str, backend: str,
                 variant: str = DEFAULT_VARIANT) -> Path | None:
    """The profile for `backend` and engine `variant` whose recorded device matches --gpu: a measured
    one before a modelled (roofline) one, and within each, the first of `directories` that has one
    (this machine's generated dir, then the committed one: export/tree_store.py search_dirs)."""
    dirs = [directories] if isinstance(directories, Path) else list(directories)
    found: dict[str, list[Path]] = {MEASURED: [], ROOFLINE: []}
    for directory in dirs:
        matches = []
        for path in sorted(Path(directory).glob(profile_filename("*", backend, variant))):
            profile = load_profile(path)
            kind = "cpu" if profile.device_key == "cpu" else "cuda"
            try:
                check_device(gpu, kind, profile.device_name)
            except DeviceMismatchError:
                continue
            matches.append((path, profile.source))
        if len(matches) > 1:
            names = ", ".join(p.name for p, _ in matches)
            raise ProfileError(f"--gpu {gpu} matches several profiles in {directory} ({names}): name the GPU more "
                               f"precisely or pass --profile")
        for path, source in matches:
            found[source].append(path)
    return next(iter(found[MEASURED] + found[ROOFLINE]), None)


def search_inputs(model_dir: str, checkpoint: Path, method: str, stats_path: Path, profile_path: Path,
                  variant: str = DEFAULT_VARIANT) -> tuple[CheckpointIdentity, AcceptanceStats, LatencyProfile]:
    """Identity of the model and checkpoint loaded now, and the statistics and profile, both checked
    against it and against the engine `variant` searched for."""
    identity = checkpoint_identity(model_dir, checkpoint, method)
    stats = load_stats(stats_path)
    stats.check_identity(identity.model_fingerprint, identity.checkpoint_sha256)
    stats.check_variant(variant, stats_path)
    profile = load_profile(profile_path)
    profile.check_variant(variant, profile_path)
    if profile.model_fingerprint != identity.model_fingerprint:
        raise ProfileError(f"{profile_path} was measured for model {profile.model_fingerprint}, not "
                           f"{identity.model_fingerprint}: re-measure it with `python -m tools trees profile`")
    return identity, stats, profile
