"""How `make peers` builds llama.cpp (llama-cpp-python from its source package) for this CPU.

Not with GGML_NATIVE=ON: -march=native turns on, on an AMX Xeon, ggml's AMX backend, which repacks
q4_1 weights into its own buffers, and there every q4_1 decode of llama-cpp-python 0.3.36 segfaulted
inside llama_decode (f32 and q8_0 ran; llama.cpp's own tracker has the same crash in
ggml_backend_amx_mul_mat on other models, machine-dependent and unfixed). So the build names the vector
extensions itself from /proc/cpuinfo, the same ones -march=native would use, with AMX off:

    python -m tools.peers.llamacpp_build cmake-args      the GGML_* flags for CMAKE_ARGS

and `make peers` then decodes a few tokens of every GGUF type, each in a process of its own:

    python -m tools.peers.llamacpp_build check [--model DIR]

so a build that still crashes on this CPU is reported there, naming the type and the signal (exit 1),
instead of in the middle of a bench (where the run is reported as failed, tools/peers/process.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.devices import cpu_flags
from export.paths import DEFAULT_MODEL_DIR
from tools.bench.runs import PeerFailed
from tools.peers import llamacpp
from tools.peers.llamacpp_gguf import GGUF_TYPES, wheels_dir
from tools.peers.process import PeerProcess

# ggml's x86 options (ggml/CMakeLists.txt) and the /proc/cpuinfo flags each needs, in that file's order.
GGML_X86_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
# Off whatever the CPU has: the AMX backend is the path whose q4_1 decode crashed (above).
DISABLED = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cmake_args(flags: set[str]) -> list[str]:
    """-D options for a CPU with these /proc/cpuinfo `flags`: native off, each extension it has on, AMX off."""
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in GGML_X86_OPTIONS:
        args.append(f"-D{option}={'ON' if all(flag in flags for flag in needs) else 'OFF'}")
    return args + [f"-D{option}=OFF" for option in DISABLED]


SMOKE_PROMPT = list(range(1, 17))   # token ids: any in-vocabulary ids exercise the decode path
SMOKE_TOKENS = 8


def smoke_test(model_dir: str | Path, gguf_type: str, threads: int) -> str | None:
    """Decode SMOKE_TOKENS of the `gguf_type` GGUF in a process of its own: None when it ran, else why
    it died (the signal)."""
    kwargs = {"model_dir": str(model_dir), "gguf_type": gguf_type, "threads": threads, "max_context": 256,
              "eos_token_ids": [], "max_new_tokens": SMOKE_TOKENS}
    try:
        with PeerProcess(f"llamacpp@{gguf_type}", llamacpp.bench_runner, kwargs) as peer:
            peer(SMOKE_PROMPT)
    except PeerFailed as exc:
        return str(exc)
    return None


def check(model_dir: str | Path) -> int:
    """Every GGUF type decodes on this CPU (0), or which crash and how to rebuild (1)."""
    crashed = []
    for gguf_type in GGUF_TYPES:
        failure = smoke_test(model_dir, gguf_type, llamacpp.onnxruntime_threads())
        print(f"{gguf_type}: " + (f"decodes {SMOKE_TOKENS} tokens" if failure is None else failure))
        if failure is not None:
            crashed.append(gguf_type)
    if crashed:
        print(f"llama.cpp crashes decoding {', '.join(crashed)} on this CPU, so the bench will report those runs as "
              f"failed. The build's flags come from `python -m tools.peers.llamacpp_build cmake-args`; after changing "
              f"them rebuild with `rm {wheels_dir()}/llama_cpp_python-*.built* && make peers`", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.peers.llamacpp_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cmake-args", help="the GGML_* flags of this CPU, AMX off")
    checking = sub.add_parser("check", help="decode a few tokens of every GGUF type, each in its own process")
    checking.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="HF checkpoint dir")
    args = parser.parse_args(argv)
    if args.command == "cmake-args":
        print(" ".join(cmake_args(cpu_flags())))
        return 0
    return check(args.model)


if __name__ == "__main__":
    sys.exit(main())
