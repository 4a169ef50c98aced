"""Where `trees build` writes and reads (export/tree_store.py): generated files under artifacts/trees/,
committed files untouched unless asked, nothing done when a tree is current, and the roofline profile
for a GPU this machine lacks (a measured profile wins)."""

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import model_fingerprint
from export.ppd import PPDConfig, save_prompt_tokens
from tools.treesearch import build as tree_build
from tools.treesearch.files import find_profile
from export.tree_store import generated_dir, recorded_inputs_sha256, search_dirs
from tools.treesearch.cli import main
from trees import load_ppd_trees, prompt_tokens_sha256
from trees.latency import LatencyProfile, load_profile
from trees.stats import AcceptanceStats

REPO = Path(__file__).resolve().parents[2]


def _profile(fingerprint: str, key="cpu", name="cpu: test", backend="torch", slope=0.002, base=0.03, top=16):
    sizes = tuple(range(1, top + 1))
    return LatencyProfile(key, name, backend, sizes, tuple(base + slope * s for s in sizes), 3, 300, fingerprint)


@pytest.fixture()
def committed(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A checkpoint dir playing the committed one: prompt tokens, statistics and a CPU profile."""
    directory = tmp_path / "tiny-checkpoints"
    directory.mkdir()
    rows = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    fingerprint = model_fingerprint(tiny_model_dir)
    checkpoint = save_prompt_tokens(directory / "ppd.safetensors", rows, PPDConfig(2, 1), fingerprint,
                                    dtype=torch.float32)
    rng = np.random.default_rng(0)
    steps = [(2, *[int(r) for r in rng.choice([0, 0, 0, 1, 2, 3, 4], size=2)]) for _ in range(300)]
    AcceptanceStats(2, 1, 4, tuple(steps), fingerprint, prompt_tokens_sha256(rows)).save(
        directory / "ppd-acceptance.json")
    _profile(fingerprint).save(directory / "latency-cpu-torch.json")
    return tiny_model_dir, checkpoint


def _args(model_dir: Path, checkpoint: Path, *extra: str, gpu: str = "cpu") -> list[str]:
    return ["build", "--gpu", gpu, "--model-dir", str(model_dir), "--checkpoint", str(checkpoint),
            "--budgets", "4,8,16", *extra]


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_build_writes_under_artifacts_and_does_nothing_when_current(committed, capsys):
    model_dir, checkpoint = committed
    directory, generated = checkpoint.parent, generated_dir(checkpoint.parent)
    before = _snapshot(directory)
    assert main(_args(model_dir, checkpoint)) == 0, capsys.readouterr().err
    tree = generated / "ppd-tree-cpu-torch.json"
    assert recorded_inputs_sha256(tree) and _snapshot(directory) == before         # committed dir untouched
    written = {p.name: p.stat().st_mtime_ns for p in generated.iterdir()}
    capsys.readouterr()
    assert main(_args(model_dir, checkpoint)) == 0
    out = capsys.readouterr().out
    assert f"{tree} is current" in out and "nothing to do" in out
    assert {p.name: p.stat().st_mtime_ns for p in generated.iterdir()} == written  # not even rewritten


def test_committed_files_keep_their_bytes_when_built_twice(committed, capsys):
    """--update-committed writes the committed tree once; building again (by default or asked to
    update) finds it current and writes nothing; other inputs go to artifacts, not over it; back on
    the committed inputs, the stale generated tree that would shadow the committed one is removed."""
    model_dir, checkpoint = committed
    directory, generated = checkpoint.parent, generated_dir(checkpoint.parent)
    assert main(_args(model_dir, checkpoint, "--update-committed")) == 0, capsys.readouterr().err
    committed_tree = directory / "ppd-tree-cpu-torch.json"
    assert committed_tree.is_file() and (directory / "ppd-tree-cpu-torch-search.png").is_file()
    snapshot = _snapshot(directory)
    for extra in ((), ("--update-committed",), ()):
        capsys.readouterr()
        assert main(_args(model_dir, checkpoint, *extra)) == 0
        assert f"{committed_tree} is current" in capsys.readouterr().out
        assert _snapshot(directory) == snapshot
    assert not (generated / "ppd-tree-cpu-torch.json").exists()
    # Other inputs (another search config): a generated tree, the committed one keeps its bytes.
    assert main(["build", "--gpu", "cpu", "--model-dir", str(model_dir), "--checkpoint", str(checkpoint),
                 "--budgets", "4,8", "--no-plots"]) == 0
    assert (generated / "ppd-tree-cpu-torch.json").is_file() and _snapshot(directory) == snapshot
    capsys.readouterr()
    assert main(_args(model_dir, checkpoint)) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "nothing to do" in out
    assert not (generated / "ppd-tree-cpu-torch.json").exists() and _snapshot(directory) == snapshot


def test_git_status_stays_clean_after_the_cli_runs(committed, capsys):
    """The committed dir as a git checkout: default builds (current or not, measured or modelled)
    leave `git status --porcelain` empty."""
    model_dir, checkpoint = committed
    directory = checkpoint.parent
    assert main(_args(model_dir, checkpoint, "--update-committed")) == 0, capsys.readouterr().err
    git = ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "committed trees"]):
        subprocess.run(git + command, check=True, capture_output=True)
    assert main(_args(model_dir, checkpoint)) == 0                                      # current: nothing
    assert main(_args(model_dir, checkpoint, "--no-plots", "--topk", "2")) == 0         # other inputs
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0  # modelled
    status = subprocess.run(git + ["status", "--porcelain"], check=True, capture_output=True, text=True).stdout
    assert status == "", status


def test_a_gpu_this_machine_lacks_gets_a_provisional_tree_from_the_roofline(committed, capsys):
    model_dir, checkpoint = committed
    directory, generated = checkpoint.parent, generated_dir(checkpoint.parent)
    names = set(_snapshot(directory))
    assert main(_args(model_dir, checkpoint, gpu="h200")) == 2                       # no profile, not asked to make one
    assert "--profile-if-missing" in capsys.readouterr().err
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0, capsys.readouterr().err
    assert "provisional" in capsys.readouterr().err
    profile = load_profile(generated / "latency-nvidia-h200-torch.json")
    assert profile.source == "roofline" and profile.device_name == "NVIDIA H200" and profile.max_tokens == 64
    trees = load_ppd_trees(generated / "ppd-tree-nvidia-h200-torch.json")
    meta = trees.metadata
    assert meta["profile_source"] == "roofline" and meta["roofline"]["gpu"] == "NVIDIA H200"
    assert meta["device"] == "NVIDIA H200" and meta["search"]["profile"] == "latency-nvidia-h200-torch.json"
    assert set(_snapshot(directory)) == names                                        # nothing committed
    # The next method's build (no --profile-if-missing) finds the modelled profile; this one is current.
    capsys.readouterr()
    assert main(_args(model_dir, checkpoint, gpu="h200")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_measured_profile_wins_over_the_modelled_one(committed, capsys):
    model_dir, checkpoint = committed
    directory, generated = checkpoint.parent, generated_dir(checkpoint.parent)
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0
    # A profile measured on an H200 arrives in the committed dir: it wins, though the generated
    # dir (searched first) holds the modelled one.
    measured = directory / "latency-nvidia-h200-torch.json"
    _profile(model_fingerprint(model_dir), "nvidia-h200", "NVIDIA H200", slope=0.01).save(measured)
    assert find_profile(search_dirs(directory), "h200", "torch") == measured
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0, capsys.readouterr().err
    meta = load_ppd_trees(generated / "ppd-tree-nvidia-h200-torch.json").metadata
    assert meta["profile_source"] == "measured" and "roofline" not in meta
    assert meta["budget"] <= 8        # the measured curve is steep: a small tree, unlike the flat roofline's


def test_on_the_gpu_a_modelled_profile_is_replaced_by_a_measurement(committed, monkeypatch, capsys):
    """With only a modelled profile and the GPU present, --profile-if-missing measures (the
    measurement itself is faked here: this machine has no GPU)."""
    model_dir, checkpoint = committed
    generated = generated_dir(checkpoint.parent)
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0
    measured_calls = []

    def fake_measure(cfg):
        measured_calls.append(cfg)
        return _profile(model_fingerprint(model_dir), "nvidia-h200", "NVIDIA H200", slope=0.01).save(cfg.out)

    monkeypatch.setattr(tree_build, "_device_present", lambda cfg: True)
    monkeypatch.setattr(tree_build, "present", lambda gpu, device: ("cuda", "cuda", "NVIDIA H200"))
    monkeypatch.setattr(tree_build, "measure_profile", fake_measure)
    assert main(_args(model_dir, checkpoint, "--profile-if-missing", gpu="h200")) == 0, capsys.readouterr().err
    assert [Path(c.out) for c in measured_calls] == [generated / "latency-nvidia-h200-torch.json"]
    assert load_profile(generated / "latency-nvidia-h200-torch.json").source == "measured"
    assert load_ppd_trees(generated / "ppd-tree-nvidia-h200-torch.json").metadata["profile_source"] == "measured"


def test_the_runtime_reads_the_generated_tree_first(committed):
    from export.devices import default_tree

    model_dir, checkpoint = committed
    directory, generated = checkpoint.parent, generated_dir(checkpoint.parent)
    fallback = directory / "hand-picked.json"
    assert default_tree("ppd", "cpu", "torch", checkpoint, fallback) == fallback
    (directory / "ppd-tree-cpu-onnxruntime.json").write_text("{}")          # committed, another backend
    assert default_tree("ppd", "cpu", "torch", checkpoint, fallback).parent == directory
    generated.mkdir(parents=True)
    (generated / "ppd-tree-cpu-onnxruntime.json").write_text("{}")          # generated, another backend
    assert default_tree("ppd", "cpu", "torch", checkpoint, fallback).parent == generated
    (directory / "ppd-tree-cpu-torch.json").write_text("{}")                # committed, this backend
    assert default_tree("ppd", "cpu", "torch", checkpoint, fallback) == directory / "ppd-tree-cpu-torch.json"
    (generated / "ppd-tree-cpu-torch.json").write_text("{}")                # generated, this backend
    assert default_tree("ppd", "cpu", "torch", checkpoint, fallback) == generated / "ppd-tree-cpu-torch.json"


def test_roofline_command_prints_and_compares(tiny_model_dir, tmp_path, capsys):
    assert main(["roofline", "--gpu", "h200", "--model-dir", str(tiny_model_dir), "--max-tokens", "8"]) == 0
    assert "NVIDIA H200" in capsys.readouterr().out
    measured = _profile(model_fingerprint(tiny_model_dir), "nvidia-h200", "NVIDIA H200", top=8).save(
        tmp_path / "measured.json")
    out = tmp_path / "compare.json"
    assert main(["roofline", "--model-dir", str(tiny_model_dir), "--compare", str(measured), "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["tokens"] for p in points] == list(range(1, 9)) and all(p["ratio"] > 1 for p in points)
    assert main(["roofline", "--gpu", "b200", "--model-dir", str(tiny_model_dir)]) == 2
    assert "NVIDIA H200" in capsys.readouterr().err                         # the known GPUs are listed


def test_make_tree_gpu_cpu_leaves_the_real_checkout_unchanged(real_model_dir, trained_ppd_checkpoint, capsys):
    """`make tree GPU=cpu`'s builds on the committed inputs: the tracked checkpoint files keep their
    bytes and `git status` of checkpoints/ does not change; building again does nothing. (Without
    --profile-if-missing: on a CPU other than the profile's, or with an engine exported by other code,
    that flag re-times the steps, which is a measurement, not a test; what it writes goes to artifacts/.)"""
    checkpoints = REPO / "checkpoints"

    def state():
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "checkpoints"],
                                capture_output=True, text=True, check=True).stdout
        return status, {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(checkpoints.rglob("*")) if p.is_file()}

    before = state()
    common = ["--gpu", "cpu", "--backend", "onnxruntime", "--model-dir", str(real_model_dir), "--no-plots"]
    runs = [["build", "--method", "ppd", *common], ["build", "--method", "hybrid", *common]]
    for argv in runs:
        assert main(argv) == 0, capsys.readouterr().err
    assert state() == before
    capsys.readouterr()
    for argv in runs:
        assert main(argv) == 0
    assert capsys.readouterr().out.count("nothing to do") == len(runs) and state() == before
