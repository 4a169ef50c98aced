"""Fixtures and helpers shared by the training tests (PPD and HT)."""

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sharp_tiny_model_dir(real_model_dir, tmp_path_factory):
    """A 2-layer, hidden-32 random Llama with the real tokenizer, initialised wide (std 0.2) so its
    next-token distributions are peaked enough for a few training steps to show (the std-0.02 tiny
    model of conftest is nearly uniform: its KL starts at ~0.03 and is noise)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-32")
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_sharegpt(path, count=300):
    """A small ShareGPT-style file, truncated mid-record like the packaged one."""
    rng = np.random.default_rng(0)
    words = "the a cat dog runs jumps over under blue red quick slow code python list sort".split()
    items = []
    for i in range(count):
        turns = []
        for _ in range(2):
            turns.append({"from": "human", "value": " ".join(rng.choice(words, 8)) + "?"})
            turns.append({"from": "gpt", "value": " ".join(rng.choice(words, 30)) + "."})
        items.append({"id": f"c{i}_0", "conversations": turns})
    text = json.dumps(items)
    path.write_text(text[: len(text) - 40])
    return path


def interrupt_and_resume(module, train, config, crash_at_call: int, monkeypatch):
    """Run `train(config)` with `module.sample_forward` raising KeyboardInterrupt on its crash_at_call-th
    call (pick one after a checkpoint was saved), check the resume file is there, train again and return
    the resumed run's result."""
    real_forward, calls = module.sample_forward, []

    def crashing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at_call:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(module, "sample_forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert config.resume_path.is_file(), "the interrupted run left no resume file"
    monkeypatch.setattr(module, "sample_forward", real_forward)
    return train(config)


def tiny_train_fields(model_dir, root, **method_fields) -> dict:
    """The settings both tiny training runs share (8 samples, 5 epochs, a resume point every step) plus
    the method's own (`lr` and the method's shape)."""
    return dict(model_dir=model_dir, sharegpt=write_sharegpt(root / "sharegpt.json"), data_dir=root / "data",
                train_samples=8, val_samples=4, epochs=5, batch_samples=2, max_context_tokens=40,
                continuation_tokens=10, generation_batch=4, checkpoint_every=1, device="cpu", eval_initial=True,
                save_dtype="float32", **method_fields)


def tiny_run_fixtures(name: str, config_cls, train, **method_fields):
    """The module fixtures of a trainer's tests, to assign to `tiny_setup, tiny_run`: `tiny_setup` is
    (root dir, the settings of every run: tiny_train_fields + `method_fields`), `tiny_run` is (config,
    result) of the full run, made once and read by several tests."""

    @pytest.fixture(scope="module")
    def tiny_setup(sharp_tiny_model_dir, tmp_path_factory):
        root = tmp_path_factory.mktemp(f"train-{name}")
        return root, tiny_train_fields(sharp_tiny_model_dir, root, **method_fields)

    @pytest.fixture(scope="module")
    def tiny_run(tiny_setup):
        root, base = tiny_setup
        config = config_cls(output=root / "full" / f"{name}.safetensors", **base)
        return config, train(config, command=f"python -m train {name} (test)")

    return tiny_setup, tiny_run


def assert_loss_lowered(config, result) -> None:
    """A tiny run learned: the last epoch's mean loss is below 90% of the first's (every epoch visits the
    same samples, so epoch means compare like with like), validation loss fell too, and the top-1/top-10
    accuracies of the 3 predicted positions are sane."""
    steps_per_epoch = len(result.losses) // config.epochs
    first, last = np.mean(result.losses[:steps_per_epoch]), np.mean(result.losses[-steps_per_epoch:])
    assert last < 0.9 * first, (first, last)
    assert result.val_loss < result.val_loss_initial  # and it carries over to held-out samples
    assert len(result.top1) == len(result.top10) == 3
    assert all(0 <= a <= b <= 1 for a, b in zip(result.top1, result.top10))


def assert_cli_reports_a_missing_dataset(main, command: str, model_dir, tmp_path, capsys) -> None:
    """`python -m train <command>` with a ShareGPT file that is not there: exit 2, saying so."""
    code = main([command, "--model-dir", str(model_dir), "--sharegpt", str(tmp_path / "missing.json"),
                 "--output", str(tmp_path / "x.safetensors"), "--device", "cpu"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
