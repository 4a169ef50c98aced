"""The device a run uses, by its real name, and the tree searched for it (trees/devices.py
names the files)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from runtime.tree_store import search_dirs
from trees.devices import DEFAULT_VARIANT, DeviceMismatchError, device_key, find_device_tree


def device_name(device: str) -> str:
    """The real name of `device`: the GPU's name, or "cpu: <CPU model> (<cores> cores, <threads> threads)"."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


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
    runtime/tree_store.py), else fp32's for this device and backend, else fp32's for this device on
    another backend, else `fallback` (trees/devices.py find_device_tree)."""
    kind, name = present_device(device)
    return find_device_tree(search_dirs(Path(checkpoint).parent), device_key(kind, name), backend, method, fallback,
                            variant)
