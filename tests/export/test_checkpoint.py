import numpy as np
import pytest
import torch

from export.__main__ import main as export_main
from export.checkpoint import (CheckpointError, GGUFSource, HFSource, check_model_dir, checkpoint_family,
                               load_checkpoint, make_model_dir, model_fingerprint)
from tests.export.tiny_families import tiny_model


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_dir(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        check_model_dir(tmp_path)


def test_a_causal_lm_of_another_family_is_refused(tmp_path):
    """A tiny GPT-2 is a causal LM, of a family the step does not implement: refused naming both, and
    converting it writes nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"'gpt2' causal LM, a family ppdeploy does not support.*gemma3"):
        check_model_dir(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="'gpt2' causal LM"):
        make_model_dir(HFSource(tmp_path / "gpt2"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]       # no out dir, no temp dir


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               vocab_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="'bert' BertForMaskedLM, not a causal language model"):
        check_model_dir(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="not a causal language model"):
        make_model_dir(HFSource(tmp_path / "bert"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def tiny_gguf(path, architecture: str):
    """A GGUF holding only its architecture and one tensor: enough to be refused from its metadata."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture, match", [("gpt2", "'gpt2' causal LM, a family ppdeploy does not support"),
                                                 ("bert", "holds a 'bert' model")])
def test_gguf_of_an_unsupported_model_is_refused_from_its_metadata(tmp_path, architecture, match):
    gguf = tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(CheckpointError, match=match):
        make_model_dir(GGUFSource(gguf), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf.name]


def test_hf_source_becomes_an_fp32_checkpoint_dir(tmp_path, real_model_dir):
    """`python -m export model --hf DIR`: a supported family in bf16 -> an fp32 safetensors dir."""
    from transformers import AutoTokenizer

    source = tmp_path / "qwen3-bf16"
    tiny_model("qwen3", vocab_size=len(AutoTokenizer.from_pretrained(real_model_dir))).to(torch.bfloat16) \
        .save_pretrained(source)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(source)
    assert export_main(["model", "--hf", str(source), "--out", str(tmp_path / "qwen3")]) == 0
    model, _ = load_checkpoint(tmp_path / "qwen3")
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.dtype == torch.float32
    assert checkpoint_family(tmp_path / "qwen3").family == "qwen3"
    assert export_main(["model", "--hf", str(source), "--gguf", "x.gguf", "--out", str(tmp_path / "y")]) != 0


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not load"):
        load_checkpoint(tmp_path)


def test_fingerprint_tells_models_apart(tmp_path, tiny_model_dir, real_model_dir):
    assert model_fingerprint(tiny_model_dir) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(tiny_model_dir) != model_fingerprint(real_model_dir)
