"""Device keys and the per-device file names of latency profiles and searched trees.

A device is known by its real name (torch.cuda.get_device_name, or the CPU model); files are keyed
by a slug of that name, never by what a user typed or by a model path:

    cpu                      -> key "cpu" (one key for CPUs: the profile records the exact model and
                                its vector extensions, and `make tree` measures again a profile of a
                                CPU with other extensions: tools/treesearch/build.py measured_on_another_cpu)
    NVIDIA H100 80GB HBM3    -> key "nvidia-h100-80gb-hbm3"

next to the model's prompt-token checkpoint (committed), or in this machine's generated dir
(artifacts/trees/<checkpoint dir>/, export/tree_store.py), which readers search first:

    latency-<key>-<backend>.json       step latency against tree size (trees.latency.LatencyProfile);
                                       one per device and backend, shared by ppd and ht (same step
                                       cost per tree size: ht's maps add k [T, H] x [H, H] products)
    <method>-tree-<key>-<backend>.json the searched tree set of ppd or ht (+ .png pictures beside it)
    latency-<key>-<backend>-variants.png  the latency curves of every engine variant of the device

A weight-only quantized engine variant (export/quantize.py: int8, int4) steps at another cost per tree
size, so its profile and trees are its own: the variant goes last, `latency-cpu-onnxruntime-int4.json`,
`ppd-tree-cpu-onnxruntime-int4.json`. The fp32 engine (DEFAULT_VARIANT) keeps the names without one.
Backend and variant names carry no '-', which is how a name's parts are told apart (find_device_tree).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


# The engine variant whose files carry no variant in their name, and what a profile, statistics or
# tree file that records none was made on (files from before variants). export/quantize.py lists the
# variants and imports this one from here (trees/ is the ground floor).
DEFAULT_VARIANT = "fp32"


class DeviceMismatchError(ValueError):
    """The device named on the command line is not the one present."""


def device_key(device_type: str, device_name: str) -> str:
    if device_type == "cpu":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a device key from the device name {device_name!r}")
    return slug


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def check_device(requested: str, device_type: str, device_name: str) -> None:
    """Raise DeviceMismatchError unless `requested` (e.g. `--gpu h100`, `--gpu cpu`) names the device
    present. `cpu` matches a CPU device; anything else must occur, case- and punctuation-
    insensitively and on word boundaries, in the GPU's real name ('h100' in 'NVIDIA H100 80GB HBM3')."""
    want = _words(requested)
    if not want:
        raise DeviceMismatchError("--gpu needs a device name: 'cpu', or part of the GPU's name such as 'h100'")
    if want == "cpu":
        if device_type != "cpu":
            raise DeviceMismatchError(f"--gpu cpu was given, but the device used is {device_type} ({device_name}); "
                                      f"pass --device cpu, or name the GPU (e.g. --gpu '{device_name}')")
        return
    if device_type == "cpu":
        raise DeviceMismatchError(f"--gpu {requested} was given, but this run uses the CPU ({device_name}) "
                                  f"(no CUDA device, or --device cpu): use --gpu cpu, or run on a machine with "
                                  f"that GPU")
    if f" {want} " not in f" {_words(device_name)} ":
        raise DeviceMismatchError(f"--gpu {requested} does not match the GPU present, {device_name!r}: "
                                  f"profiles and trees are per device; run on a {requested} or pass --gpu "
                                  f"'{device_name}'")


def variant_suffix(variant: str) -> str:
    """What a file name of `variant` adds: nothing for fp32 (the names from before variants), else
    '-<variant>'."""
    return "" if variant == DEFAULT_VARIANT else f"-{variant}"


def profile_filename(key: str, backend: str, variant: str = DEFAULT_VARIANT) -> str:
    return f"latency-{key}-{backend}{variant_suffix(variant)}.json"


def tree_filename(key: str, backend: str, method: str, variant: str = DEFAULT_VARIANT) -> str:
    return f"{method}-tree-{key}-{backend}{variant_suffix(variant)}.json"


def engine_label(backend: str, variant: str = DEFAULT_VARIANT) -> str:
    """A backend with its variant when it is not fp32 ("onnxruntime int4"): for messages and titles."""
    return backend if variant == DEFAULT_VARIANT else f"{backend} {variant}"


def variant_latencies_filename(key: str, backend: str) -> str:
    """The picture of the latency curves of every variant profiled for a device and backend."""
    return f"latency-{key}-{backend}-variants.png"


def find_device_tree(directories: str | Path | Sequence[str | Path], key: str, backend: str, method: str,
                     fallback: str | Path, variant: str = DEFAULT_VARIANT) -> Path:
    """The tree searched for this device, backend and engine variant, in the first of `directories`
    that has one (the runtime passes this machine's generated dir, then the committed one); else
    fp32's tree for this device and backend (a variant without its own tree); else fp32's for this
    device on another backend (same hardware, similar latency curve); else `fallback` (the
    hand-picked tree)."""
    dirs = [Path(directories)] if isinstance(directories, (str, Path)) else [Path(d) for d in directories]
    for name in dict.fromkeys((tree_filename(key, backend, method, variant), tree_filename(key, backend, method))):
        for directory in dirs:
            if (directory / name).is_file():
                return directory / name
    prefix, suffix = tree_filename(key, "*", method).split("*")
    for directory in dirs:
        # The '*' of fp32's name is the backend alone: a '-' in it is a variant's file.
        others = sorted(p for p in directory.glob(f"{prefix}*{suffix}")
                        if "-" not in p.name[len(prefix):len(p.name) - len(suffix)])
        if others:
            return others[0]
    return Path(fallback)
