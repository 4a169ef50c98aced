"""train/ht.py: the pseudo pass equals the inference step, gradients reach only the maps, a tiny
end-to-end run lowers the loss, resume, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import train.ht as train_ht_module
from export.checkpoint import load_checkpoint, model_fingerprint
from export.ht import TransferMaps, layout_config, load_transfer_maps, transfer_map_metadata
from export.ppd import attach_prompt_tokens
from export.step_model import StepModel, lowest_mask_value
from tests.export.tiny_families import tiny_model
from tests.train.conftest import (assert_cli_reports_a_missing_dataset, assert_loss_lowered, interrupt_and_resume,
                                  tiny_run_fixtures)
from train.__main__ import build_parser, main
from train.common import usable_positions
from train.ht import HTTrainConfig, sample_forward, train_ht
from trees import buffers_from_parents
from trees.config_args import config_from_args


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_ht_step(request, tiny_model_dir):
    """The tiny Llama, and a tiny Gemma 3 whose sliding window (5) bites in a 14-token sample."""
    hf = load_checkpoint(tiny_model_dir)[0] if request.param == "llama" else tiny_model(request.param)
    hidden = hf.config.hidden_size
    g = torch.Generator().manual_seed(0)
    maps = TransferMaps(torch.eye(hidden) + 0.3 * torch.randn(3, hidden, hidden, generator=g) / hidden ** 0.5,
                        0.1 * torch.randn(3, hidden, generator=g), layer=0)
    model = StepModel(hf, transfer_maps=maps)
    model.transfer.weight.requires_grad_(True)
    model.transfer.bias.requires_grad_(True)
    return model


def test_pseudo_pass_matches_the_inference_step(tiny_ht_step, monkeypatch):
    """Sequence KV once + all pseudo groups through layers l+1.. == one inference tree per q
    (the real chain 0..q with the pseudo slots attached after q)."""
    model = tiny_ht_step
    k = model.transfer.num_maps
    seq = np.random.default_rng(0).integers(0, model.vocab_size, 14)
    captured = {}
    real_scores = train_ht_module.distill_scores

    def capture(student_logp, teacher, weights):
        captured["student"] = student_logp.detach()
        return real_scores(student_logp, teacher, weights)

    monkeypatch.setattr(train_ht_module, "distill_scores", capture)
    with torch.no_grad():
        out = sample_forward(model, seq, 7, False, torch.ones(k))
    qs = usable_positions(14, 7, False, k)
    assert out.groups == len(qs) == captured["student"].shape[0]
    empty = [torch.zeros(0, model.num_kv_heads, model.head_dim)] * model.num_layers
    for g, q in enumerate(qs):
        parents, tokens = attach_prompt_tokens(list(range(-1, q)), seq[: q + 1].tolist(), int(q), layout_config(k),
                                               model.vocab_size)
        buffers = buffers_from_parents(parents)
        mask = torch.where(torch.tensor(buffers.ancestor_mask), 0.0, lowest_mask_value(torch.float32))
        depth = torch.tensor(buffers.depth)
        with torch.no_grad():
            logits, _, _ = model(torch.tensor(tokens), depth, mask, empty, empty, None,
                                 *model.sliding_masks(mask, depth, 0))
        torch.testing.assert_close(captured["student"][g], torch.log_softmax(logits[q + 1:], -1), rtol=1e-4,
                                   atol=1e-4)


def test_loss_reaches_only_the_maps(tiny_ht_step):
    model = tiny_ht_step
    seq = np.random.default_rng(1).integers(0, model.vocab_size, 20)
    model.transfer.weight.grad = model.transfer.bias.grad = None
    out = sample_forward(model, seq, 8, False, 0.8 ** torch.arange(3.0))
    out.loss.backward()
    assert model.transfer.weight.grad.abs().sum() > 0 and model.transfer.bias.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("transfer."))
    assert (out.top10 >= out.top1).all() and out.kl.shape == (3,)


tiny_setup, tiny_run = tiny_run_fixtures("ht", HTTrainConfig, train_ht, num_maps=3, layer=0, lr=0.02)


def test_tiny_training_run_lowers_the_loss(tiny_run):
    assert_loss_lowered(*tiny_run)


def test_tiny_run_writes_a_loadable_checkpoint_and_report(tiny_run, sharp_tiny_model_dir):  # noqa: F811
    config, result = tiny_run
    hidden = load_checkpoint(sharp_tiny_model_dir)[0].config.hidden_size
    maps = load_transfer_maps(config.output, model_fingerprint(sharp_tiny_model_dir), hidden)
    assert maps.num_maps == 3 and maps.layer == 0 and maps.weight.shape == (3, hidden, hidden)
    meta = transfer_map_metadata(config.output)
    assert meta["val_top1"] == result.top1 and meta["command"] == "python -m train ht (test)"
    assert meta["trainable_parameters"] == 3 * hidden * hidden + 3 * hidden and meta["init"] == "identity"
    assert json.loads(config.report_path.read_text())["val_top10"] == result.top10
    assert not config.resume_path.exists()


def test_interrupted_run_resumes_to_the_same_result(tiny_setup, tiny_run, monkeypatch):
    root, base = tiny_setup
    config = HTTrainConfig(output=root / "resumed" / "ht.safetensors", **base)
    # 4 initial validation samples first, then the 7th training sample: step 4, after step 3 was saved
    resumed = interrupt_and_resume(train_ht_module, train_ht, config, crash_at_call=7 + 4, monkeypatch=monkeypatch)
    full_config, full = tiny_run
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    fp = model_fingerprint(base["model_dir"])
    hidden = int(round(full.trainable_parameters ** 0.5 / 3 ** 0.5))
    a, b = load_transfer_maps(config.output, fp, hidden), load_transfer_maps(full_config.output, fp, hidden)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["ht"])
    assert config_from_args(args) == HTTrainConfig()
    args = build_parser().parse_args(["ht", "--layer", "7", "--num-maps", "2", "--no-resume"])
    assert dataclasses.replace(HTTrainConfig(), layer=7, num_maps=2, resume=False) == config_from_args(args)


def test_cli_reports_a_missing_dataset(tiny_model_dir, tmp_path, capsys):
    assert_cli_reports_a_missing_dataset(main, "ht", tiny_model_dir, tmp_path, capsys)


@pytest.mark.parametrize("fields, match", [(dict(continuation_tokens=3, num_maps=3), "continuation_tokens"),
                                           (dict(num_maps=0), "num_maps"), (dict(layer=-1), "layer")])
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        HTTrainConfig(**fields)
