"""tools/bench/quality.py on a tiny random Llama's vanilla engines (fp32, int8, int4): the perplexity equals an
independent transformers computation, fp32's greedy outputs equal transformers' greedy ones and agree with
themselves fully, missing engines and differing token ids are refused, and the CLI writes its report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import export.engine
from export.engine import engine_dir, prepare_engine
from export.methods import MethodExtras
from tools.commands import main as runtime_main
from tools.bench.prompts import PromptItem
from tools.bench.quality import (EngineMissingError, QualityConfig, QualityError, agreement, common_prefix,
                             format_table, measure_quality)

MAX_CONTEXT, MAX_TREE = 256, 16
MAX_TOKENS, NEW_TOKENS = 40, 12
# Synthetic conversations (the text source is injectable): one longer than MAX_TOKENS, one starting with
# the assistant, one with a system turn.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris. It has been the capital for centuries and is on the Seine. " * 4}],
    [{"role": "assistant", "content": "Sure, here is a poem about the sea."},
     {"role": "user", "content": "Thanks!"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1 2 3 4 5 6 1 2 3"}],
]
PROMPTS = [PromptItem("a", "Hello"), PromptItem("b", "Write a poem about the sea"),
           PromptItem("c", "def add(a, b):")]


@pytest.fixture(scope="module")
def engines_root(tiny_dir, tmp_path_factory):
    """An artifacts root holding the tiny model's vanilla engine dirs: fp32, int8, int4."""
    root = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export.engine, "ARTIFACTS_DIR", root)
        for variant in ("fp32", "int8", "int4"):   # the variants come from a row-exact fp32 export of their own
            prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                           variant=variant)
    return root


@pytest.fixture
def artifacts(engines_root, monkeypatch):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", engines_root)
    return engines_root


def config(tiny_dir, variants=("fp32", "int8", "int4")) -> QualityConfig:
    return QualityConfig(variants=variants, model_dir=tiny_dir, num_sequences=len(CONVERSATIONS),
                         max_tokens=MAX_TOKENS, prompts=len(PROMPTS), max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def report(tiny_dir, engines_root):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export.engine, "ARTIFACTS_DIR", engines_root)
        return measure_quality(config(tiny_dir), CONVERSATIONS, PROMPTS, show_progress=False)


def test_perplexity_equals_an_independent_transformers_computation(report, tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    nlls, counts = [], []
    for messages in CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids[:MAX_TOKENS]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        nlls.append(-logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item())
        counts.append(len(ids) - 1)
    fp32 = report.result("fp32")
    assert fp32.sequence_tokens == tuple(counts) and counts[0] == MAX_TOKENS - 1   # the long one was cut
    assert fp32.sequence_nll == pytest.approx(nlls, rel=1e-5)
    assert fp32.perplexity == pytest.approx(math.exp(sum(nlls) / sum(counts)), rel=1e-5)
    for variant in ("int8", "int4"):   # other weights: another perplexity, on the same predicted tokens
        other = report.result(variant)
        assert other.sequence_tokens == fp32.sequence_tokens and math.isfinite(other.perplexity)
        assert other.perplexity != fp32.perplexity


def test_fp32_outputs_are_greedy_and_agree_with_themselves(report, tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    fp32 = report.result("fp32")
    for item, got in zip(PROMPTS, fp32.outputs):
        text = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert list(got) == out[0, len(ids):].tolist(), item.id
    self_agreement = report.agreement("fp32")
    assert self_agreement.identical == len(PROMPTS) == self_agreement.prompts
    assert self_agreement.common_prefix == tuple(len(o) for o in fp32.outputs)
    for variant in ("int8", "int4"):
        agree = report.agreement(variant)
        assert agree.identical == sum(o == r for o, r in zip(report.result(variant).outputs, fp32.outputs))
        assert all(0 <= p <= NEW_TOKENS for p in agree.common_prefix)


def test_report_json_and_table(report, tiny_dir, artifacts):
    data = json.loads(json.dumps(report.to_json()))
    assert data["config"]["variants"] == ["fp32", "int8", "int4"] and data["prompt_ids"] == ["a", "b", "c"]
    rows = {row["variant"]: row for row in data["variants"]}
    assert rows["fp32"]["perplexity_delta"] == 0 and rows["fp32"]["identical_outputs"] == len(PROMPTS)
    assert rows["int4"]["engine_dir"] == str(engine_dir(tiny_dir, "cpu", "vanilla", "int4"))
    # (Not below fp32 here: the tiny model's weights are mostly its [H, V] embedding table, kept fp32 beside
    # the quantized LM head.)
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"]
    table = format_table(report).splitlines()
    assert table[0].startswith("| variant | weight bytes | perplexity | Δ vs fp32 | identical 12-token outputs /3 |")
    assert len(table) == 5 and table[2].startswith("| fp32 |") and "| — | 3 |" in table[2]


def test_common_prefix_and_agreement():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0 and common_prefix([], []) == 0
    agree = agreement([[1, 2, 3], [1, 2], [7]], [[1, 2, 3], [1, 2, 3], [8]])
    assert agree.identical == 1 and agree.common_prefix == (3, 2, 0) and agree.mean_common_prefix == 5 / 3
    with pytest.raises(QualityError, match="measure the same prompts"):
        agreement([[1]], [[1], [2]])


def test_config_is_checked():
    with pytest.raises(QualityError, match="lack fp32, the reference"):
        QualityConfig(variants=("int4",))
    with pytest.raises(QualityError, match="name one variant twice"):
        QualityConfig(variants=("fp32", "int4", "int4"))
    with pytest.raises(ValueError, match="unknown engine variant 'int3'"):
        QualityConfig(variants=("fp32", "int3"))
    with pytest.raises(QualityError, match="max_tokens must be >= 2"):
        QualityConfig(max_tokens=1)


def test_missing_variant_names_the_make_command(tiny_dir, artifacts, tmp_path, monkeypatch):
    """Only the fp32 dir exists: both missing variants are named, each with its make command."""
    fp32 = engine_dir(tiny_dir, "cpu", "vanilla")   # read before re-pointing the artifacts root
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path)
    target = engine_dir(tiny_dir, "cpu", "vanilla")
    target.parent.mkdir(parents=True)
    target.symlink_to(fp32)
    with pytest.raises(EngineMissingError) as error:
        measure_quality(config(tiny_dir), CONVERSATIONS, PROMPTS, show_progress=False)
    message = str(error.value)
    assert "`make engine GPU=cpu QUANT=int8`" in message and "`make engine GPU=cpu QUANT=int4`" in message
    assert "QUANT=fp32" not in message


def test_token_ids_must_match_fp32(tiny_dir, artifacts, tmp_path, monkeypatch):
    """An int4 dir whose chat template differs from the fp32 dir's is refused before it is scored."""
    for variant in ("fp32", "int4"):   # copies (files linked) under another artifacts root
        source = engine_dir(tiny_dir, "cpu", "vanilla", variant)
        target = tmp_path / source.relative_to(artifacts)
        target.mkdir(parents=True)
        for path in source.iterdir():
            if path.name != "chat_template.jinja":
                (target / path.name).symlink_to(path)
        template = (source / "chat_template.jinja").read_text()
        (target / "chat_template.jinja").write_text(template if variant == "fp32" else
                                                    template.replace("helpful", "unhelpful"))
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path)
    with pytest.raises(QualityError, match="int4 engine's tokenizer gives other token ids than fp32's for sequences"):
        measure_quality(config(tiny_dir, ("fp32", "int4")), CONVERSATIONS, PROMPTS, show_progress=False)


def test_cli_writes_the_report_and_prints_the_table(tiny_dir, artifacts, tmp_path, capsys):
    """The default text sources (ShareGPT validation, MT-Bench, HumanEval), cut small."""
    out = tmp_path / "quality" / "report.json"
    assert runtime_main(["quality", "--model-dir", str(tiny_dir), "--variants", "fp32,int4", "--num-sequences", "2",
                         "--max-tokens", "32", "--prompts", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fp32 |" in printed and "| int4 |" in printed and "identical 4-token outputs /2" in printed
    data = json.loads(out.read_text())
    assert data["format"] == "ppdeploy-quality" and data["prompt_ids"] == ["mtbench-81", "HumanEval/0"]
    assert [row["sequence_tokens"] for row in data["variants"]] == [[31, 31]] * 2
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]   # no temp file left


def test_cli_errors_name_the_fix(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path)
    assert runtime_main(["quality", "--model-dir", str(tiny_dir), "--variants", "fp32,int8"]) == 2
    assert "build it with `make engine GPU=cpu QUANT=int8`" in capsys.readouterr().err
    assert runtime_main(["quality", "--model-dir", str(tiny_dir), "--variants", "int8"]) == 2
    assert "lack fp32" in capsys.readouterr().err
