"""python -m runtime trees: device checks, and build from statistics + profile to a tree the runtime accepts."""

import json

import numpy as np
import pytest
import torch

from export.checkpoint import model_fingerprint
from export.ppd import PPDConfig, save_prompt_tokens
from runtime.__main__ import main as runtime_main
from runtime.tree_store import generated_dir
from runtime.trees_cli import main
from trees import TreeError, check_tree_identity, load_ppd_trees, prompt_tokens_sha256
from trees.latency import LatencyProfile
from trees.stats import AcceptanceStats


def test_gpu_that_is_not_present_is_an_error(capsys):
    assert runtime_main(["trees", "profile", "--gpu", "h100", "--device", "cpu"]) == 2  # python -m runtime trees
    assert "uses the CPU" in capsys.readouterr().err
    assert main(["profile", "--gpu", "no such gpu"]) == 2  # no CUDA here, or a GPU of another name
    assert "--gpu no such gpu" in capsys.readouterr().err


@pytest.fixture()
def ppd_dir(tiny_model_dir, tmp_path):
    """A prompt-token checkpoint for the tiny model, with statistics and a CPU profile beside it."""
    rows = torch.randn(2, 64) * 0.02
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", rows, PPDConfig(2, 1),
                                    model_fingerprint(tiny_model_dir), dtype=torch.float32)
    rng = np.random.default_rng(0)
    steps = [(2, *[int(r) for r in rng.choice([0, 0, 0, 1, 2, 3, 4], size=2)]) for _ in range(300)]
    stats = AcceptanceStats(2, 1, 4, tuple(steps), model_fingerprint(tiny_model_dir), prompt_tokens_sha256(rows))
    stats.save(tmp_path / "ppd-acceptance.json")
    sizes = tuple(range(1, 17))
    LatencyProfile("cpu", "cpu: test", "torch", sizes, tuple(0.03 + 0.002 * s for s in sizes), 3, 300,
                   model_fingerprint(tiny_model_dir)).save(tmp_path / "latency-cpu-torch.json")
    return tiny_model_dir, checkpoint, stats, rows


def test_build_writes_a_tree_for_this_model_and_checkpoint(ppd_dir, tmp_path, capsys):
    model_dir, checkpoint, stats, rows = ppd_dir
    args = ["build", "--gpu", "cpu", "--model-dir", str(model_dir), "--checkpoint", str(checkpoint),
            "--budgets", "4,8,16"]
    assert main(args) == 0, capsys.readouterr().err
    tree_path = generated_dir(tmp_path) / "ppd-tree-cpu-torch.json"   # artifacts/trees/<checkpoint dir>/
    assert not (tmp_path / "ppd-tree-cpu-torch.json").exists()         # the committed place is left alone
    trees = load_ppd_trees(tree_path)
    meta = trees.metadata
    assert meta["device"] == "cpu: test" and meta["backend"] == "torch" and meta["budget"] <= 16
    assert meta["command"].startswith("python -m runtime trees build --gpu cpu ")
    assert meta["expected_speedup"] > 1 and meta["expected_mean_accepted"] > 1
    assert [f["budget"] for f in meta["fixed_budgets"]] == [4, 8, 16]
    for suffix in ("latency", "search", "trees"):
        assert (generated_dir(tmp_path) / f"ppd-tree-cpu-torch-{suffix}.png").stat().st_size > 10_000
    check_tree_identity(trees, model_fingerprint(model_dir), prompt_tokens_sha256(rows))
    with pytest.raises(TreeError, match="built for checkpoint tensors"):
        check_tree_identity(trees, model_fingerprint(model_dir), prompt_tokens_sha256(rows + 1))


def test_build_refuses_statistics_of_another_checkpoint(ppd_dir, tmp_path, capsys):
    model_dir, checkpoint, stats, rows = ppd_dir
    save_prompt_tokens(checkpoint, rows + 0.01, PPDConfig(2, 1), model_fingerprint(model_dir), dtype=torch.float32)
    assert main(["build", "--gpu", "cpu", "--model-dir", str(model_dir), "--checkpoint", str(checkpoint)]) == 2
    assert "retrained" in capsys.readouterr().err
    assert not (generated_dir(tmp_path) / "ppd-tree-cpu-torch.json").exists()


def test_build_needs_a_profile_of_the_named_device(ppd_dir, capsys):
    model_dir, checkpoint, _, _ = ppd_dir
    assert main(["build", "--gpu", "h100", "--model-dir", str(model_dir), "--checkpoint", str(checkpoint)]) == 2
    assert "no torch latency profile for --gpu h100" in capsys.readouterr().err


def test_sweep_runs_every_variant_losslessly(ppd_dir, tmp_path, capsys):
    model_dir, checkpoint, _, _ = ppd_dir
    common = ["--gpu", "cpu", "--model-dir", str(model_dir), "--checkpoint", str(checkpoint)]
    assert main(["build", *common, "--budgets", "4,8", "--no-plots"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Tell me about the sea."}\n')
    report = tmp_path / "sweep.json"
    assert main(["sweep", *common, "--budgets", "4,8", "--prompts", str(prompts), "--max-new-tokens", "8",
                 "--out", str(report)]) == 0, capsys.readouterr().err  # 0 = every variant matched vanilla
    rows = json.loads(report.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["vanilla", "chosen (ppd-tree-cpu-torch.json)", "fixed budget 4",
                                            "fixed budget 8"]
    assert all(r["matches_vanilla"] == 1 for r in rows) and rows[1]["predicted_mean_accepted"] > 1


def test_ht_trees_build_and_sweep_next_to_the_maps(tiny_model_dir, tmp_path, capsys):
    """--method ht: statistics keyed by the maps' hash, ht-tree-<device>-<backend>.json beside the maps
    (ppd's files in the same dir are not used), a sweep that stays lossless, and the runtime's default ht
    tree is the searched one."""
    from export.ht import TransferMaps, save_transfer_maps
    from runtime import Generator

    g = torch.Generator().manual_seed(0)
    maps = TransferMaps(torch.eye(64) + 0.1 * torch.randn(2, 64, 64, generator=g), torch.zeros(2, 64), layer=0)
    checkpoint = save_transfer_maps(tmp_path / "ht.safetensors", maps, model_fingerprint(tiny_model_dir),
                                    dtype=torch.float32)
    rng = np.random.default_rng(0)
    steps = [(2, *[int(r) for r in rng.choice([0, 0, 1, 2, 4], size=2)]) for _ in range(300)]
    AcceptanceStats(2, 1, 4, tuple(steps), model_fingerprint(tiny_model_dir), maps.sha256).save(
        tmp_path / "ht-acceptance.json")
    sizes = tuple(range(1, 17))
    LatencyProfile("cpu", "cpu: test", "torch", sizes, tuple(0.03 + 0.002 * s for s in sizes), 3, 300,
                   model_fingerprint(tiny_model_dir)).save(tmp_path / "latency-cpu-torch.json")
    common = ["--gpu", "cpu", "--method", "ht", "--model-dir", str(tiny_model_dir), "--checkpoint", str(checkpoint)]
    assert main(["build", *common, "--budgets", "4,8", "--no-plots"]) == 0, capsys.readouterr().err
    trees = load_ppd_trees(generated_dir(tmp_path) / "ht-tree-cpu-torch.json")
    assert trees.metadata["method"] == "ht" and trees.metadata["checkpoint_sha256"] == maps.sha256
    assert not (generated_dir(tmp_path) / "ppd-tree-cpu-torch.json").exists()
    gen = Generator.from_pretrained(tiny_model_dir, method="ht", checkpoint=str(checkpoint))
    assert gen.proposer.trees == trees
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Tell me about the sea."}\n')
    assert main(["sweep", *common, "--budgets", "4", "--prompts", str(prompts), "--max-new-tokens", "8"]) == 0
    # Maps retrained after the search: the tree (and statistics) no longer name them.
    save_transfer_maps(checkpoint, TransferMaps(maps.weight + 0.01, maps.bias, 0), model_fingerprint(tiny_model_dir),
                       dtype=torch.float32)
    with pytest.raises(TreeError, match="retrained"):
        Generator.from_pretrained(tiny_model_dir, method="ht", checkpoint=str(checkpoint))


def test_hybrid_build_splits_the_budget_with_the_ngram_source(ppd_dir, tmp_path, capsys):
    """build --method hybrid reads ppd's statistics and the n-gram statistics, and records the n-gram
    budget it chose in the tree file, where the runtime's hybrid picks it up."""
    from runtime import Generator
    from trees.ngram_stats import NgramStats, save_ngram_stats

    model_dir, checkpoint, stats, rows = ppd_dir
    args = ["build", "--gpu", "cpu", "--method", "hybrid", "--model-dir", str(model_dir), "--checkpoint",
            str(checkpoint), "--budgets", "4,8,16"]
    assert main(args) == 2 and "ngram-stats" in capsys.readouterr().err       # no n-gram statistics yet
    fingerprint = model_fingerprint(model_dir)
    save_ngram_stats(tmp_path / "ngram-acceptance.json",
                     [NgramStats(8, 1000, (100, 50, 50, 50, 100, 50, 50, 50, 300), fingerprint),
                      NgramStats(8, 1000, (20, 20, 20, 20, 100, 50, 50, 50, 300), fingerprint, min_ngram=2)])
    assert main(args) == 0, capsys.readouterr().err
    trees = load_ppd_trees(generated_dir(tmp_path) / "hybrid-tree-cpu-torch.json")
    hybrid = trees.metadata["hybrid"]
    assert hybrid["ngram_depth"] >= 1 and hybrid["ngram_statistics"] == "ngram-acceptance.json"
    assert trees.metadata["expected_mean_accepted"] > hybrid["ppd_part_mean_accepted"]
    gen = Generator.from_pretrained(model_dir, method="hybrid", checkpoint=str(checkpoint),
                                    tree=str(generated_dir(tmp_path) / "hybrid-tree-cpu-torch.json"), max_context=256)
    assert gen.proposer.source.depth == hybrid["ngram_depth"]
    assert hybrid["min_ngram"] == 2 == gen.proposer.source.min_ngram   # the source right more often per proposal
    assert main(["sweep", "--gpu", "cpu", "--method", "hybrid", "--model-dir", str(model_dir), "--checkpoint",
                 str(checkpoint)]) == 2
    assert "bench" in capsys.readouterr().err
