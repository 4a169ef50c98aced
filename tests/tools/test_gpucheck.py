"""The device check's plan, step runner and report (tools/gpucheck/), on the CPU."""

import json

import pytest

from tools.commands import trees_in
from tools.gpucheck.plan import QUICK, Sizes, Step
from tools.gpucheck.report import MachineFacts, write_report
from tools.gpucheck.run import REPORTS_DIR, groups, main, plan_for, previous_results, run_step, run_steps


def facts(device="cuda", providers=("CPUExecutionProvider",), tensorrt=None) -> MachineFacts:
    name = "NVIDIA H200" if device == "cuda" else "cpu: test"
    key = "nvidia-h200" if device == "cuda" else "cpu"
    return MachineFacts(device, name, key, {"onnxruntime": "1.31.1", "torch": "x"}, tuple(providers), tensorrt,
                        (0.1, 0.1, 0.1))


def by_name(steps):
    return {s.name: s for s in steps}


def test_plan_on_a_gpu_measures_bf16_first_and_skips_what_is_missing_with_the_fix(tmp_path):
    steps = by_name(plan_for(facts(), tmp_path, Sizes()))
    profile = steps["profile-bf16"].argv
    assert profile[profile.index("--dtype") + 1] == "bf16" and "NVIDIA H200" in profile
    assert profile[profile.index("--out") + 1] == str(tmp_path / "latency-nvidia-h200-torch-bf16.json")
    assert "onnxruntime-gpu" in steps["bench-onnxruntime-fp32"].skip
    assert "tensorrt is not importable" in steps["tensorrt-engine"].skip
    bench = steps["bench-bf16"].argv   # the trees searched in this run, both prompt sets, the compiled HF peer
    assert bench[bench.index("--trees") + 1] == str(tmp_path)
    assert bench[bench.index("--prompts") + 1] == "mtbench[:10]+humaneval[:10]"
    assert "hf-compiled" in bench[bench.index("--methods") + 1] and bench[bench.index("--repeats") + 1] == "3"
    batch = steps["batch-bf16"].argv
    assert batch[batch.index("--batch-sizes") + 1] == "1,4,16,64"
    order = list(steps)
    assert order.index("profile-bf16") < order.index("tree-ppd") < order.index("bench-bf16") < order.index("bench-fp32")
    # every file a step writes lands in the report folder (but engines)
    for step in steps.values():
        if "--out" in step.argv and step.name != "tensorrt-engine":
            assert step.argv[step.argv.index("--out") + 1].startswith(str(tmp_path))


def test_tree_searches_run_beside_the_cuda_tests():
    batches = groups(plan_for(facts(), REPORTS_DIR, QUICK))
    assert [s.name for s in batches[1]] == ["tree-ppd", "tree-ht", "tree-hybrid", "cuda-tests"]
    assert all(len(b) == 1 for b in batches[2:])


def test_plan_with_everything_present_skips_nothing(tmp_path):
    steps = plan_for(facts(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), tensorrt="10.13"), tmp_path,
                     QUICK)
    assert [s.name for s in steps if s.skip] == []


def test_plan_on_the_cpu_skips_the_gpu_only_steps(tmp_path):
    skipped = {s.name for s in plan_for(facts("cpu"), tmp_path, QUICK) if s.skip}
    assert skipped == {"cuda-tests", "roofline", "tensorrt-engine", "tensorrt-parity"}


def test_run_step_records_failure_timeout_skip_and_out_of_time(tmp_path):
    fail = run_step(Step("fail", ("-c", "print('first'); print('the reason'); raise SystemExit(3)"), 30), tmp_path)
    assert (fail.status, fail.note) == ("failed", "the reason")
    assert (tmp_path / "fail.log").read_text().startswith("first")
    slow = run_step(Step("slow", ("-c", "import time; time.sleep(30)"), 0.5), tmp_path)
    assert slow.status == "timeout" and slow.seconds < 10
    assert run_step(Step("ok", ("-c", "print('done')"), 30), tmp_path).status == "passed"
    assert run_step(Step("skip", ("-c", ""), 30, skip="no GPU"), tmp_path).status == "skipped"
    late = run_step(Step("late", ("-c", ""), 30), tmp_path, seconds_left=5)
    assert late.status == "not run" and "out of time" in late.note


def test_steps_of_a_group_run_side_by_side(tmp_path):
    sleep = ("-c", "import time; time.sleep(1.5)")
    results = run_steps([Step("a", sleep, 30, group="g"), Step("b", sleep, 30, group="g")], tmp_path)
    assert [r.status for r in results] == ["passed", "passed"]
    assert max(r.seconds for r in results) < 2.8   # not one after the other


def test_report_sections_from_the_files_the_steps_wrote(tmp_path):
    prompts = [{"id": i, "token_ids": [1] * 10, "steps": 10, "seconds": 0.1} for i in ("mtbench-81", "HumanEval/0")]
    fast = [dict(p, seconds=0.05, steps=5) for p in prompts]
    runs = [{"label": "vanilla", "method": "vanilla", "variant": "fp32", "tokens_per_s": 100.0, "mean_accepted": 1.0,
             "speedup_vs_vanilla": 1.0, "matches_vanilla": 2, "prompts": prompts},
            {"label": "hybrid", "method": "hybrid", "variant": "fp32", "tokens_per_s": 200.0, "mean_accepted": 2.0,
             "speedup_vs_vanilla": 2.0, "matches_vanilla": 2, "prompts": fast}]
    (tmp_path / "bench-torch-bf16.json").write_text(json.dumps(
        {"prompts": "mtbench[:1]+humaneval[:1]", "max_new_tokens": 10, "backend": "torch", "device": "cuda",
         "repeats": 3, "runs": runs}))
    (tmp_path / "hybrid-tree-nvidia-h200-torch.json").write_text(json.dumps({"expected_speedup": 1.6}))
    text = write_report(tmp_path, facts(), [run_step(Step("ok", ("-c", "print('fine')"), 30), tmp_path)],
                        dry_run=False).read_text()
    assert "# gpu-check on NVIDIA H200" in text and "| ok | passed |" in text
    assert "| hybrid | 200.0 | 2.00x | 200.0 | 2.00x |" in text          # per prompt set
    assert "| hybrid | 1.60x | 2.00x | +25 % | outside 15 % |" in text    # predicted against measured
    assert "vanilla's own step (prefill included) 10.00 ms" in text


def test_dry_run_without_cuda_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: a plain run would not be a dry run")
    out = tmp_path / "report"
    assert main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "tensorrt-engine" in printed and "batch-bf16" in printed
    assert not out.exists()


def test_bench_trees_folder_picks_one_tree_per_method(tmp_path):
    (tmp_path / "ppd-tree-nvidia-h200-torch.json").write_text("{}")
    (tmp_path / "ht-tree-nvidia-h200-torch.json").write_text("{}")
    chosen = trees_in(str(tmp_path), ("vanilla", "ppd", "hybrid", "ht"))
    assert chosen == {"ppd": {"tree": str(tmp_path / "ppd-tree-nvidia-h200-torch.json")},
                      "ht": {"tree": str(tmp_path / "ht-tree-nvidia-h200-torch.json")}}
    (tmp_path / "ppd-tree-cpu-torch.json").write_text("{}")
    with pytest.raises(ValueError, match="several ppd trees"):
        trees_in(str(tmp_path), ("ppd",))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        trees_in(str(tmp_path / "missing"), ("ppd",))
    assert trees_in(None, ("ppd",)) == {}


def test_a_rerun_of_some_steps_keeps_the_others_in_the_report(tmp_path):
    first = [run_step(Step("a", ("-c", "print('one')"), 30), tmp_path),
             run_step(Step("b", ("-c", "raise SystemExit(1)"), 30), tmp_path)]
    write_report(tmp_path, facts(), first, dry_run=False)
    kept = previous_results(tmp_path, rerun={"b"})
    assert [(r.name, r.status) for r in kept] == [("a", "passed")]


def test_missing_model_or_prompt_sets_are_named(tmp_path, monkeypatch):
    import tools.bench.prompts
    from tools.gpucheck.run import missing_inputs

    def no_package(name, limit=None):
        raise FileNotFoundError(f"package for {name} is not installed: run `make setup`")

    monkeypatch.setattr(tools.bench.prompts, "load_prompts", no_package)
    missing = missing_inputs(tmp_path / "no-model")
    assert len(missing) == 3 and "does not exist" in missing[0] and "humaneval" in missing[2]
