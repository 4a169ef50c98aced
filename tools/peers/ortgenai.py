"""The `ortgenai` peer for the bench: onnxruntime-genai greedy decoding on its own export of the model.

onnxruntime-genai is the anchor our onnxruntime backend is measured against (same runtime, its own
fused graph: GroupQueryAttention, SkipSimplifiedLayerNorm, KV cache shared in place, C++ loop).
Its model is built once by its own builder into artifacts/engines/<model>/cpu/ortgenai/:

    python -m onnxruntime_genai.models.builder -i MODEL_DIR -o OUT -p fp32 -e cpu

Optional: needs `onnxruntime-genai` (and the `onnx-ir` its builder imports) installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from export.checkpoint import model_fingerprint
from export.paths import ARTIFACTS_DIR
from tools.bench.runs import PromptRun, Runner

STAMP = "ppdeploy-source.json"  # model fingerprint the genai export was built from


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def ortgenai_model_dir(model_dir: str | Path) -> Path:
    return ARTIFACTS_DIR / "engines" / Path(model_dir).resolve().name / "cpu" / "ortgenai"


def ensure_ortgenai_model(model_dir: str | Path, log=print) -> Path:
    """Build the genai fp32 CPU model of `model_dir` unless one for the same fingerprint exists."""
    if not available():
        raise RuntimeError("the ortgenai peer needs `pip install onnxruntime-genai==0.18.0 onnx-ir==1.1.0`")
    out = ortgenai_model_dir(model_dir)
    fingerprint = model_fingerprint(model_dir)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ortgenai.tmp-", dir=out.parent))
    try:
        log(f"building the onnxruntime-genai model of {model_dir} -> {out}")
        built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                                "-o", str(work / "model"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"the onnxruntime-genai builder failed on {model_dir}:\n{built.stderr[-2000:]}")
        (work / "model" / STAMP).write_text(json.dumps({"fingerprint": fingerprint}))
        if out.exists():
            shutil.rmtree(out)
        (work / "model").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def ortgenai_runner(model_dir: str | Path, max_new_tokens: int) -> Callable[[list[int]], tuple[list[int], float]]:
    """prompt ids -> (new token ids, seconds): greedy, stops at EOS or after max_new_tokens."""
    import onnxruntime_genai as og

    model = og.Model(str(ensure_ortgenai_model(model_dir)))

    def run(prompt_ids: list[int]) -> tuple[list[int], float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
        seconds = time.perf_counter() - start
        return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]], seconds
    return run


def bench_runner(model_dir: str | Path, max_new_tokens: int) -> Runner:
    """onnxruntime-genai greedy on its own fp32 CPU export of the model (the anchor of our ORT backend)."""
    run = ortgenai_runner(model_dir, max_new_tokens)

    def bench_run(prompt_ids: list[int]) -> PromptRun:
        tokens, seconds = run(prompt_ids)
        return PromptRun(tokens, len(tokens), seconds)  # one token per forward after the prefill
    return bench_run
