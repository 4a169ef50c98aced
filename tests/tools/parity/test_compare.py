"""python -m tools check: real step inputs recorded from the decode loop, saved in Polygraphy's input
format, and every runner compared with the torch step through Polygraphy's Comparator."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from tools.commands import main as tools_main
from export.manifest import Manifest
from export.onnx_export import ExportConfig, export_onnx
from tools.parity.compare import DEFAULT_TOLERANCES, Tolerance, parse_tolerances, run_parity
from tools.parity.feeds import check_feeds, feed_label, load_feeds
from tools.parity.runners import StepRunner, engine_runners, step_model_from_engine
from tests.export.tiny_llama import make_tiny_llama

MAX_CONTEXT, MAX_TREE = 256, 16


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, real_model_dir) -> Manifest:
    tiny = make_tiny_llama(tmp_path_factory.mktemp("tiny"), real_model_dir, seed=5)
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    return export_onnx(ExportConfig(tiny, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)


@pytest.fixture(scope="module")
def tiny_check(tiny_engine, tmp_path_factory):
    """`python -m tools check` on the tiny engine: (exit code, out dir)."""
    out = tmp_path_factory.mktemp("parity")
    return tools_main(["check", str(tiny_engine.dir), "--out", str(out)]), out


def test_tiny_engine_torch_and_onnxruntime_agree(tiny_check, capsys):
    code, out = tiny_check
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["ok"], report["mismatches"]
    assert report["compared"][0][0] == "onnxruntime" and report["reference"] == "torch"
    # TensorRT is skipped with the reason on a machine without it (or without engine.plan in the dir)
    assert [name for name, _ in report["skipped"]] == ["tensorrt"] or report["compared"][-1][0] == "tensorrt"
    steps = report["steps"]
    assert any(s.startswith("prefill") and "S=0" in s and "T=1 " not in s for s in steps)   # the prompt's prefill
    assert "prefill T=1 S=0" in steps                                                      # no cache at all
    assert {f"probe tree T={t}" for t in (4, 16)} <= {s.rsplit(" ", 1)[0] for s in steps}  # trees, capped at max
    assert {o["output"] for o in report["outputs"]} == {"logits", "new_keys", "new_values"}
    assert len(report["outputs"]) == 3 * len(steps) and len(report["argmax"]) == len(steps)


def test_recorded_inputs_load_with_polygraphy(tiny_check, tiny_engine):
    from polygraphy.json import load_json

    _, out = tiny_check
    feeds = load_json(str(out / "inputs.json"))
    assert isinstance(feeds, list) and feeds
    for feed in feeds:
        assert list(feed) == tiny_engine.input_names
        t, s = feed["input_ids"].shape[0], feed["past_key.0"].shape[0]
        assert feed["tree_mask"].shape == (t, t) and feed["tree_mask"].dtype == np.float32
        assert feed["past_value.1"].shape == (s, 2, 16)
        assert feed["position_ids"].min() >= s                                  # depth + committed length
    check_feeds(feeds, tiny_engine)
    trees = [f for f in feeds if feed_label(f).startswith("tree")]
    assert trees, "no recorded step has a branching tree mask"
    mask = trees[0]["tree_mask"]
    assert (mask == 0).sum() < (mask.shape[0] * (mask.shape[0] + 1)) // 2     # some ancestor hidden
    assert mask.min() == np.finfo(np.float32).min                               # lowest finite, never -inf


def test_check_on_loaded_inputs_with_strict_tolerances_fails(tiny_check, tiny_engine, tmp_path, capsys):
    """--inputs replays a recording; --tolerances 0:0 leaves no room for onnxruntime's rounding: exit 1,
    every step's mismatch listed at once."""
    _, out = tiny_check
    code = tools_main(["check", str(tiny_engine.dir), "--inputs", str(out / "inputs.json"), "--tolerances", "0:0",
                        "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 1 and "FAIL:" in text
    report = json.loads((tmp_path / "report.json").read_text())
    failed_steps = {o["step"] for o in report["outputs"] if not o["passed"]}
    assert failed_steps == set(range(len(report["steps"])))


class NoisyRunner(StepRunner):
    """The torch step with noise added to one output: a runner that is wrong in one place."""

    def __init__(self, step, manifest, output: str, scale: float) -> None:
        super().__init__(step, manifest, name="noisy")
        self.output, self.scale = output, scale

    def infer_impl(self, feed_dict):
        outputs = super().infer_impl(feed_dict)
        noise = np.random.default_rng(0).normal(0.0, self.scale, outputs[self.output].shape)
        outputs[self.output] = (outputs[self.output] + noise).astype(outputs[self.output].dtype)
        return outputs


@pytest.fixture(scope="module")
def tiny_parts(tiny_engine, tiny_check):
    feeds = load_feeds(tiny_check[1] / "inputs.json")
    return step_model_from_engine(tiny_engine), feeds


def test_a_noisy_runner_fails_naming_the_output(tiny_parts, tiny_engine):
    step, feeds = tiny_parts
    tolerances = parse_tolerances(None, tiny_engine.dtype)
    report = run_parity(StepRunner(step, tiny_engine), [(NoisyRunner(step, tiny_engine, "new_values", 0.05), "noise")],
                        feeds, tolerances)
    assert not report.ok
    bad = [o for o in report.outputs if not o.passed]
    assert {o.output for o in bad} == {"new_values"}                    # only the perturbed output ...
    assert {o.step for o in bad} == set(range(len(feeds)))             # ... in every step, all reported
    assert all("new_values" in line for line in report.mismatches)
    assert all(a.passed for a in report.argmax)                         # logits untouched


def test_a_perturbed_weight_fails_on_logits_and_argmax(tiny_parts, tiny_engine):
    """A second torch step whose LM head has one column scaled: the logits of that token move, KV does not."""
    step, feeds = tiny_parts
    perturbed = copy.deepcopy(step)
    logits = step(torch.from_numpy(feeds[0]["input_ids"]), torch.from_numpy(feeds[0]["position_ids"]),
                  torch.from_numpy(feeds[0]["tree_mask"]), [torch.zeros(0, 2, 16)] * 2, [torch.zeros(0, 2, 16)] * 2)[0]
    used = {int(t) for feed in feeds for t in feed["input_ids"]}   # tied embeddings: keep the inputs' rows intact
    token = next(int(t) for t in logits[-1].argsort() if int(t) not in used)
    with torch.no_grad():
        perturbed.lm_head_t[:, token] *= -50.0          # the least likely token becomes the most likely
    report = run_parity(StepRunner(step, tiny_engine), [(StepRunner(perturbed, tiny_engine, name="perturbed"), "w")],
                        feeds, parse_tolerances(None, tiny_engine.dtype))
    assert {o.output for o in report.outputs if not o.passed} == {"logits"}
    assert not report.argmax[0].passed and report.argmax[0].differ[-1][2] == token
    assert any("logits argmax differs" in line for line in report.mismatches)


def test_a_runner_that_crashes_is_reported_not_fatal(tiny_parts, tiny_engine):
    class Broken(StepRunner):
        def infer_impl(self, feed_dict):
            raise RuntimeError("device lost")

    step, feeds = tiny_parts
    runners, _ = engine_runners(tiny_engine, ["onnxruntime"])
    report = run_parity(StepRunner(step, tiny_engine), [(Broken(step, tiny_engine, name="broken"), "x"), *runners],
                        feeds[:2], parse_tolerances(None, tiny_engine.dtype))
    assert report.errors == (("broken", "RuntimeError: device lost"),)
    assert [name for name, _ in report.compared] == ["onnxruntime"]     # the others still ran and compared
    assert not report.ok and report.mismatches[0].startswith("broken: failed to run")


def test_tolerances_parse_per_output():
    assert parse_tolerances(None, "float32") == DEFAULT_TOLERANCES["float32"]
    assert parse_tolerances("1e-2:0", "float16") == {"": Tolerance(1e-2, 0.0)}
    assert parse_tolerances("logits=2e-3:1e-3, new_keys=1e-4:1e-4", "float32") == {
        **DEFAULT_TOLERANCES["float32"], "logits": Tolerance(2e-3, 1e-3), "new_keys": Tolerance(1e-4, 1e-4)}
    assert parse_tolerances("logits=1:1,0.5:0", "float16") == {"": Tolerance(0.5, 0.0), "logits": Tolerance(1, 1)}
    for bad in ("1e-3", "logits=abc:1", "-1:0"):
        with pytest.raises(ValueError, match="tolerances"):
            parse_tolerances(bad, "float32")


def test_feeds_that_do_not_fit_the_engine_are_refused(tiny_parts, tiny_engine):
    _, feeds = tiny_parts
    wrong = OrderedDict(feeds[0])
    wrong["position_ids"] = wrong["position_ids"].astype(np.int32)
    with pytest.raises(ValueError, match="position_ids is int32"):
        check_feeds([wrong], tiny_engine)


def test_fp16_engine_passes_with_fp16_tolerances(tiny_engine, tmp_path):
    """An fp16 graph: inputs recorded in fp16 (mask at fp16's lowest finite value), compared with the fp32
    torch step at the fp16 tolerances."""
    fp16 = export_onnx(ExportConfig(tiny_engine.model.source_dir, tmp_path / "fp16", dtype="fp16",
                                    max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)
    assert tools_main(["check", str(fp16.dir), "--out", str(tmp_path / "parity")]) == 0
    feeds = load_feeds(tmp_path / "parity" / "inputs.json")
    assert feeds[0]["tree_mask"].dtype == np.float16 and feeds[0]["tree_mask"].min() == np.finfo(np.float16).min


def test_real_ppd_engine_passes(real_model_dir, trained_ppd_checkpoint, tmp_path, capsys):
    """The real model's ppd engine dir (`make engine`): prefill, one-token prefill, vanilla / ngram / ppd /
    hybrid decode steps, torch against onnxruntime's saved optimised graph."""
    from export.engine import prepare_engine
    from export.methods import METHODS
    from export.checkpoint import model_fingerprint

    extras = METHODS["ppd"].load_extras(trained_ppd_checkpoint, model_fingerprint(real_model_dir), 576)
    engine = prepare_engine(real_model_dir, "ppd", extras)
    code = tools_main(["check", str(engine.dir), "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(s.startswith("ppd decode") for s in report["steps"]) and any(
        s.startswith("hybrid decode") for s in report["steps"])
    assert all(a["agree"] == a["rows"] for a in report["argmax"])


def test_tensorrt_is_skipped_with_the_reason(tiny_engine, tmp_path, monkeypatch):
    """No TensorRT runner without tensorrt, engine.plan and a CUDA GPU: each missing piece is named."""
    import dataclasses
    import types

    import export.trt.host

    runners, skipped = engine_runners(tiny_engine, ["tensorrt"])
    assert runners == [] and skipped[0][0] == "tensorrt" and "has no engine.plan" in skipped[0][1]
    (tmp_path / "engine.plan").write_bytes(b"plan")
    with_plan = dataclasses.replace(tiny_engine, dir=tmp_path)
    monkeypatch.setattr(export.trt.host, "import_tensorrt", lambda: types.SimpleNamespace(__version__="11.4"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runners, skipped = engine_runners(with_plan, ["tensorrt"])
    assert runners == [] and skipped == [("tensorrt", "torch sees no CUDA GPU here to run engine.plan on")]
    with pytest.raises(ValueError, match="unknown runner"):
        engine_runners(tiny_engine, ["tensorrt", "openvino"])
