"""The device a run uses, by its real name, and the tree searched for it (trees/devices.py
names the files)."""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

from export.tree_store import search_dirs
from trees.devices import DEFAULT_VARIANT, DeviceMismatchError, device_key, find_device_tree


# The vector extensions CPU kernels dispatch on (onnxruntime's MLAS, llama.cpp's ggml): x86 flags and
# ARM features of /proc/cpuinfo, in this order. Two CPUs of one model name can differ in them: the
# "AMD EPYC" machines lent to this project stepped int4 trees 1.9x faster with AVX-512 than without, so a
# CPU's latency profile records them (trees.latency.LatencyProfile.cpu_isa).
KERNEL_ISA = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8",
              "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's flags (x86) or features (ARM) in /proc/cpuinfo (`cpuinfo`: its text, read when
    None); empty where it lists none (another OS)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The KERNEL_ISA extensions this CPU has (`cpuinfo`: the text of /proc/cpuinfo, read when None),
    space separated; "" where /proc/cpuinfo lists none (another OS)."""
    flags = cpu_flags(cpuinfo)
    return " ".join(ext for ext in KERNEL_ISA if ext in flags)


def device_name(device: str) -> str:
    """The real name of `device`: the GPU's name, or "cpu: <CPU model> (<cores> cores, <threads> threads;
    <vector extensions>)"."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    cpuinfo = _cpuinfo()
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    isa = cpu_isa(cpuinfo)
    return f"cpu: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads{'; ' + isa if isa else ''})"


def present_device(device: str) -> tuple[str, str]:
    """(type, real name) of `device` ("cpu", "cuda", "cuda:1"): the GPU's name from torch, or the
    CPU model with its core and thread counts."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceMismatchError(f"device {device!r} asked for, but torch sees no CUDA device on this machine "
                                  f"({device_name('cpu')}); use the CPU (--gpu cpu / device 'cpu')")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use cpu or cuda")
    return dev.type, device_name(device)


def default_tree(method: str, device: str, backend: str, checkpoint: str | Path, fallback: str | Path,
                 variant: str = DEFAULT_VARIANT) -> Path:
    """The `method` (ppd, ht) tree searched for this device, backend and engine variant
    (<method>-tree-<device key>-<backend>[-<variant>].json: the one `make tree` wrote on this machine
    under artifacts/trees/, else the committed one next to the method's checkpoint;
    export/tree_store.py), else fp32's for this device and backend, else fp32's for this device on
    another backend, else `fallback` (trees/devices.py find_device_tree)."""
    kind, name = present_device(device)
    return find_device_tree(search_dirs(Path(checkpoint).parent), device_key(kind, name), backend, method, fallback,
                            variant)


def warn_if_searched_for_another_cpu(path: str | Path, metadata: dict, device: str) -> None:
    """Warn when the tree at `path` (its JSON `metadata`) was searched on the latency profile of a CPU
    with other vector extensions than this one has: its sizes were chosen for another step cost."""
    recorded = metadata.get("cpu_isa")
    if recorded is None or torch.device(device).type != "cpu":
        return
    here = cpu_isa()
    if recorded == here:
        return
    variant = metadata.get("variant", DEFAULT_VARIANT)
    warnings.warn(f"{path} was searched for a CPU with {recorded or 'no listed vector extensions'}, this one has "
                  f"{here or 'none listed'}: its sizes were chosen for another step cost; `make tree GPU=cpu"
                  f"{'' if variant == DEFAULT_VARIANT else ' QUANT=' + variant}` searches one for this CPU",
                  stacklevel=3)
