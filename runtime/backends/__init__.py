"""Backends run steps over a KV cache they own (the contract: runtime/backends/base.py).

    torch_backend.py   the reference: the StepModel in PyTorch, on CPU or CUDA
    ort_backend.py     an exported step graph on onnxruntime (CPU or CUDA execution provider)
    trt_backend.py     a TensorRT engine built on this GPU

A backend takes what a loader checked (runtime/loading.py: the manifest, the graph or plan to open,
the cache size) and opens it; it never reads an engine dir itself. Backends are context managers:
`close()` releases the session / context and the cache, after which a step is refused.
"""

from __future__ import annotations

from runtime.backends.base import MANIFEST_TORCH_DTYPES, Backend, BackendClosedError, BatchBackend, ModelInfo, StepOutput
from runtime.backends.layouts import DeviceLayout

DEFAULT_BACKEND = "torch"   # the reference; `onnxruntime` is the faster CPU engine
# Weight and activation precision of the torch backend (the reference is fp32; fp16 / bf16 for GPUs).
DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_DTYPE = "fp32"


def torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return table[name]


__all__ = ["DEFAULT_BACKEND", "DEFAULT_DTYPE", "DTYPES", "MANIFEST_TORCH_DTYPES", "Backend", "BackendClosedError", "BatchBackend",
           "DeviceLayout", "ModelInfo", "StepOutput", "torch_dtype"]
