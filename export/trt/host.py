"""What building a TensorRT engine for a GPU target needs on this machine, checked before anything is
exported or written: tensorrt importable, a CUDA GPU visible to torch, and that GPU being the one
the target names (trees/devices.py matching: 'h100' matches 'NVIDIA H100 80GB HBM3')."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from trees.devices import DeviceMismatchError, check_device, device_key

INSTALL_HINT = "pip install .[tensorrt]"


@dataclass(frozen=True)
class HostFacts:
    tensorrt_version: str | None      # None: `import tensorrt` failed
    tensorrt_error: str               # why it failed ("" when it did not)
    gpu_name: str | None              # None: torch sees no CUDA device


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or ImportError naming the fix. The package index's `tensorrt` wheels are
    metapackages whose libraries come from NVIDIA: a broken install fails here with OSError too."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise ImportError(f"tensorrt is not importable ({INSTALL_HINT}; {type(exc).__name__}: {exc})") from exc
    if not hasattr(tensorrt, "Builder"):
        raise ImportError(f"tensorrt is not importable: the installed package has no Builder (a stub? {INSTALL_HINT} "
                          f"on a machine with NVIDIA's CUDA libraries)")
    return tensorrt


def probe_host() -> HostFacts:
    import torch

    try:
        version, error = import_tensorrt().__version__, ""
    except ImportError as exc:
        version, error = None, str(exc)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return HostFacts(version, error, gpu)


def missing_for_target(target: str, host: HostFacts) -> list[str]:
    """Everything this machine lacks to build a TensorRT engine for GPU `target` (empty: nothing)."""
    missing = []
    if host.tensorrt_version is None:
        missing.append(host.tensorrt_error or f"tensorrt is not importable ({INSTALL_HINT})")
    if host.gpu_name is None:
        missing.append("no CUDA GPU visible to torch (an engine is built on the GPU it will run on)")
    else:
        try:
            check_device(target, "cuda", host.gpu_name)
        except DeviceMismatchError:
            missing.append(f"GPU present is {host.gpu_name}, target asks for {target} (an engine runs only on the GPU "
                           f"that built it: build on the {target}, or for this GPU: --target "
                           f"{device_key('cuda', host.gpu_name)})")
    return missing
