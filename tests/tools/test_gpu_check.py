"""The device check's plan, step runner and report (tools/gpu_check.py), on the CPU."""

import pytest

from tools.commands import trees_in
from tools.gpu_check import QUICK, MachineFacts, Sizes, Step, main, plan, run_step, write_report


def facts(device="cuda", providers=("CPUExecutionProvider",), tensorrt=None) -> MachineFacts:
    name = "NVIDIA H200" if device == "cuda" else "cpu: test"
    key = "nvidia-h200" if device == "cuda" else "cpu"
    return MachineFacts(device, name, key, {"onnxruntime": "1.31.1", "torch": "x"}, tuple(providers), tensorrt,
                        (0.1, 0.1, 0.1))


def by_name(steps):
    return {s.name: s for s in steps}


def test_plan_on_a_gpu_without_ort_cuda_or_tensorrt_skips_them_with_the_fix(tmp_path):
    steps = by_name(plan(facts(), tmp_path, Sizes()))
    assert steps["profile-torch"].skip is None and steps["cuda-tests"].skip is None
    assert "--gpu" in steps["profile-torch"].argv and "NVIDIA H200" in steps["profile-torch"].argv
    assert "onnxruntime-gpu" in steps["bench-onnxruntime-fp32-mtbench"].skip
    assert "tensorrt is not importable" in steps["tensorrt-engine"].skip
    # the benches use the trees searched in this run
    bench = steps["bench-torch-fp32-mtbench"].argv
    assert bench[bench.index("--trees") + 1] == str(tmp_path)
    assert list(steps).index("profile-torch") < list(steps).index("tree-ppd-torch") < list(steps).index(
        "bench-torch-fp32-mtbench")


def test_plan_with_everything_present_skips_nothing(tmp_path):
    steps = plan(facts(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), tensorrt="10.13"), tmp_path,
                 QUICK)
    assert [s.name for s in steps if s.skip] == []


def test_plan_on_the_cpu_skips_the_gpu_only_steps(tmp_path):
    skipped = {s.name for s in plan(facts("cpu"), tmp_path, QUICK) if s.skip}
    assert skipped == {"cuda-tests", "roofline-vs-measured", "tensorrt-engine", "tensorrt-parity"}


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


def test_report_lists_every_step(tmp_path):
    results = [run_step(Step("ok", ("-c", "print('fine')"), 30), tmp_path)]
    text = write_report(tmp_path, facts(), results, dry_run=False).read_text()
    assert "# gpu-check on NVIDIA H200" in text and "| ok | passed |" in text


def test_dry_run_without_cuda_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: a plain run would not be a dry run")
    out = tmp_path / "report"
    assert main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "tensorrt-engine" in printed and "bench-torch-fp32-humaneval" in printed
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
    from tools.gpu_check import previous_results

    first = [run_step(Step("a", ("-c", "print('one')"), 30), tmp_path),
             run_step(Step("b", ("-c", "raise SystemExit(1)"), 30), tmp_path)]
    write_report(tmp_path, facts(), first, dry_run=False)
    kept = previous_results(tmp_path, rerun={"b"})
    assert [(r.name, r.status) for r in kept] == [("a", "passed")]


def test_missing_model_or_prompt_packages_are_named(tmp_path, monkeypatch):
    import tools.bench.prompts
    from tools.gpu_check import missing_inputs

    def no_package(name, limit=None):
        raise FileNotFoundError(f"package for {name} is not installed: run `make setup`")

    monkeypatch.setattr(tools.bench.prompts, "load_prompts", no_package)
    missing = missing_inputs(tmp_path / "no-model")
    assert len(missing) == 3 and "does not exist" in missing[0] and "humaneval" in missing[2]
