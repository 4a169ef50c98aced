"""train/ppd.py: group layout, the two-pass training forward, a tiny end-to-end run, resume, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import train.ppd as train_ppd_module
from export.checkpoint import load_checkpoint, model_fingerprint
from export.ppd import PPDConfig, attach_prompt_tokens, load_prompt_tokens, prompt_token_metadata
from export.step_model import StepModel, lowest_mask_value
from tests.export.tiny_families import tiny_model
from tests.train.conftest import (assert_cli_reports_a_missing_dataset, assert_loss_lowered, interrupt_and_resume,
                                  tiny_run_fixtures)
from train.__main__ import build_parser, main
from train.ppd import (PPDTrainConfig, build_prompt_groups, causal_mask, initial_embeddings, sample_forward,
                       train_ppd, usable_positions)
from trees import buffers_from_parents
from trees.config_args import config_from_args


def test_usable_positions_keep_every_target_on_the_continuation():
    # 10 context tokens (0..9), continuation at 10..19; N = 3.
    qs = usable_positions(20, 10, ends_with_eos=False, n=3)
    assert qs[0] == 9                  # the last context token: prompt 0 predicts position 11
    assert qs[-1] + 3 == 19            # prompt 2 reads teacher row 19, which predicts token 20
    eos = usable_positions(20, 10, ends_with_eos=True, n=3)
    assert eos[-1] + 3 == 18           # never a target after EOS
    assert len(usable_positions(12, 10, ends_with_eos=True, n=3)) == 0


def test_prompt_groups_layout():
    config = PPDConfig(num_prompt_tokens=2, ensemble=2)
    qs = np.array([4, 6])
    g = build_prompt_groups(qs, seq_len=9, config=config, vocab_size=50)
    assert g.input_ids.tolist() == [50, 51, 52, 53] * 2
    assert g.position_ids.tolist() == [5, 5, 6, 6, 7, 7, 8, 8]      # q + 1 + i
    visible_past = g.past_mask == 0
    assert visible_past[:4].sum(1).tolist() == [5] * 4               # group at q=4 sees positions 0..4
    assert visible_past[4:].sum(1).tolist() == [7] * 4
    visible = (g.tree_mask == 0).numpy()
    assert not visible[:4, 4:].any() and not visible[4:, :4].any()    # groups never see each other
    # inside a group: (i=1, j=0) sees itself and (i=0, j=0), not the other chain
    assert visible[2].tolist()[:4] == [True, False, True, False]
    assert g.target_rows.tolist() == [[5, 6], [7, 8]]
    assert (g.tree_mask[~(g.tree_mask == 0)] == lowest_mask_value(torch.float32)).all()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_step(request, tiny_model_dir):
    """The tiny Llama, and a tiny Gemma 3 whose sliding window (5) bites in a 14-token sample."""
    hf = load_checkpoint(tiny_model_dir)[0] if request.param == "llama" else tiny_model(request.param)
    model = StepModel(hf)
    config = PPDConfig(num_prompt_tokens=3, ensemble=2)
    model.extra_embeddings = torch.nn.Parameter(
        initial_embeddings(model, config, 0.5, torch.Generator().manual_seed(0)))
    return model, config


@torch.no_grad()
def test_two_pass_training_forward_matches_one_tree_per_position(tiny_step):
    """Sequence KV once + all groups behind a past mask == a separate tree (chain + prompt nodes) per q;
    on sliding-window layers the groups see only the window's part of positions 0..q."""
    model, config = tiny_step
    torch.manual_seed(0)
    seq = torch.randint(0, model.vocab_size, (14,))
    s, qs = len(seq), np.array([7, 9, 10])
    empty = [torch.zeros(0, model.num_kv_heads, model.head_dim)] * model.num_layers
    positions = torch.arange(s)
    _, keys, values = model(seq, positions, causal_mask(s), empty, empty, None,
                            *model.sliding_masks(causal_mask(s), positions, 0))
    groups = build_prompt_groups(qs, s, config, model.vocab_size)
    batched, _, _ = model(groups.input_ids, groups.position_ids, groups.tree_mask, list(keys), list(values),
                          groups.past_mask, *model.sliding_masks(groups.tree_mask, groups.position_ids, s,
                                                                 groups.past_mask))
    m = config.num_virtual_tokens
    for g, q in enumerate(qs):
        parents, tokens = attach_prompt_tokens(list(range(-1, q)), seq[: q + 1].tolist(), int(q), config,
                                               model.vocab_size)
        buffers = buffers_from_parents(parents)
        mask = torch.where(torch.tensor(buffers.ancestor_mask), 0.0, lowest_mask_value(torch.float32))
        depth = torch.tensor(buffers.depth)
        logits, _, _ = model(torch.tensor(tokens), depth, mask, empty, empty, None,
                             *model.sliding_masks(mask, depth, 0))
        torch.testing.assert_close(batched[g * m:(g + 1) * m], logits[q + 1:], rtol=1e-4, atol=1e-4)
    if model.family.has_sliding_layers:   # the window matters here: without it the groups would differ
        wide = model(groups.input_ids, groups.position_ids, groups.tree_mask, list(keys), list(values),
                     groups.past_mask, groups.tree_mask, groups.past_mask)[0]
        assert (wide - batched).abs().max() > 1e-2


def test_loss_reaches_only_the_prompt_embeddings(tiny_step):
    model, config = tiny_step
    seq = np.random.default_rng(0).integers(0, model.vocab_size, 20)
    model.extra_embeddings.grad = None
    out = sample_forward(model, seq, 8, False, config, 0.8 ** torch.arange(3.0))
    out.loss.backward()
    assert out.groups == len(usable_positions(20, 8, False, 3))
    assert model.extra_embeddings.grad is not None and model.extra_embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if name != "extra_embeddings")
    assert (out.top10 >= out.top1).all()


tiny_setup, tiny_run = tiny_run_fixtures("ppd", PPDTrainConfig, train_ppd, num_prompt_tokens=3, ensemble=2, lr=0.05)


def test_tiny_training_run_lowers_the_loss(tiny_run):
    assert_loss_lowered(*tiny_run)


def test_tiny_run_writes_a_loadable_checkpoint_and_report(tiny_run, sharp_tiny_model_dir):
    config, result = tiny_run
    hidden = load_checkpoint(sharp_tiny_model_dir)[0].config.hidden_size
    emb, ppd = load_prompt_tokens(config.output, model_fingerprint(sharp_tiny_model_dir), hidden)
    assert ppd == PPDConfig(3, 2) and emb.shape == (6, hidden)
    meta = prompt_token_metadata(config.output)
    assert meta["val_top1"] == result.top1 and meta["command"] == "python -m train ppd (test)"
    assert meta["trainable_parameters"] == 6 * hidden
    assert json.loads(config.report_path.read_text())["val_top10"] == result.top10
    assert not config.resume_path.exists()  # a finished run leaves no resume file


def test_interrupted_run_resumes_to_the_same_result(tiny_setup, tiny_run, monkeypatch):
    root, base = tiny_setup
    config = PPDTrainConfig(output=root / "resumed" / "ppd.safetensors", **base)
    # the 7th sample forward is in optimizer step 4 (2 samples a step), after step 3 was saved
    resumed = interrupt_and_resume(train_ppd_module, train_ppd, config, crash_at_call=7, monkeypatch=monkeypatch)
    full_config, full = tiny_run
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    fp = model_fingerprint(base["model_dir"])
    hidden = full.trainable_parameters // 6
    torch.testing.assert_close(load_prompt_tokens(config.output, fp, hidden)[0],
                               load_prompt_tokens(full_config.output, fp, hidden)[0], rtol=1e-5, atol=1e-6)


def test_resume_file_with_other_settings_is_refused(tiny_setup):
    root, base = tiny_setup
    config = PPDTrainConfig(output=root / "other" / "ppd.safetensors", **base)
    config.resume_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": {"lr": "1"}}, config.resume_path)
    with pytest.raises(ValueError, match="other settings.*--no-resume"):
        train_ppd(config)


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["ppd"])
    assert config_from_args(args) == PPDTrainConfig()
    args = build_parser().parse_args(["ppd", "--ensemble", "3", "--no-resume", "--lr", "0.5"])
    assert dataclasses.replace(PPDTrainConfig(), ensemble=3, resume=False, lr=0.5) == config_from_args(args)


def test_cli_reports_a_missing_dataset(tiny_model_dir, tmp_path, capsys):
    assert_cli_reports_a_missing_dataset(main, "ppd", tiny_model_dir, tmp_path, capsys)


@pytest.mark.parametrize("fields, match", [(dict(continuation_tokens=3, num_prompt_tokens=3), "continuation_tokens"),
                                           (dict(train_samples=0), "train_samples"),
                                           (dict(ensemble=0), "PPDConfig.ensemble")])
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        PPDTrainConfig(**fields)
