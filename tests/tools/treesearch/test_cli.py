"""python -m tools trees: device checks, and build from statistics + profile to a tree the runtime accepts."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import model_fingerprint
from export.manifest import Manifest
from export.ppd import PPDConfig, save_prompt_tokens
from tools.commands import main as runtime_main
from export.tree_store import generated_dir
from tools.treesearch.cli import main
from trees import TreeError, check_tree_identity, load_ppd_trees, prompt_tokens_sha256
from trees.latency import LatencyProfile
from trees.stats import AcceptanceStats


def test_gpu_that_is_not_present_is_an_error(capsys):
    assert runtime_main(["trees", "profile", "--gpu", "h100", "--device", "cpu"]) == 2  # python -m tools trees
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
    assert meta["command"].startswith("python -m tools trees build --gpu cpu ")
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


# --- engine variants (--variant; export/quantize.py) ------------------------------------------------

def test_variant_file_names_of_the_statistics():
    from tools.treesearch.files import ngram_stats_filename, stats_filename

    assert (stats_filename("ppd"), ngram_stats_filename()) == ("ppd-acceptance.json", "ngram-acceptance.json")
    assert stats_filename("ht", "fp32") == "ht-acceptance.json"
    assert (stats_filename("ppd", "int4"), ngram_stats_filename("int4")) == ("ppd-acceptance-int4.json",
                                                                             "ngram-acceptance-int4.json")


@pytest.mark.parametrize("argv", [["profile", "--gpu", "cpu"], ["stats"], ["ngram-stats"], ["build", "--gpu", "cpu"],
                                  ["sweep", "--gpu", "cpu"], ["profile", "--gpu", "cpu", "--backend", "tensorrt"]])
def test_a_quantized_variant_needs_the_onnxruntime_backend(argv, capsys):
    assert main([*argv, "--variant", "int4"]) == 2             # the default backend is torch
    err = capsys.readouterr().err
    assert "--variant int4 is a weight-only quantized onnxruntime engine" in err and "add --backend onnxruntime" in err
    with pytest.raises(SystemExit):
        main([*argv, "--variant", "int3"])                     # not a variant at all: argparse's choices


INT4_SECONDS = {1: 0.0098, 2: 0.0199, 5: 0.0217, 11: 0.0262, 16: 0.030}   # measured shape of int4 (README)


def _int4_like(fingerprint: str, variant: str = "int4") -> LatencyProfile:
    """The shape of the measured int4 curve: T=2 costs twice T=1 (GEMV for one row, SGEMM for more)."""
    sizes = tuple(range(1, 17))
    seconds = tuple(float(np.interp(s, list(INT4_SECONDS), list(INT4_SECONDS.values()))) for s in sizes)
    return LatencyProfile("cpu", "cpu: test", "onnxruntime", sizes, seconds, 3, 300, fingerprint, variant=variant)


def _fp32_like(fingerprint: str) -> LatencyProfile:
    sizes = tuple(range(1, 17))
    return LatencyProfile("cpu", "cpu: test", "onnxruntime", sizes, tuple(0.018 + 0.001 * s for s in sizes), 3, 300,
                          fingerprint)


def test_build_per_variant_refuses_other_variants_inputs_and_says_when_slower(ppd_dir, tmp_path, capsys):
    """build --variant int4 reads the int4 profile and statistics (refusing fp32's under that name or
    passed explicitly), writes ppd-tree-cpu-onnxruntime-int4.json with its own PNGs and the picture of
    every variant's latency curve, and says plainly that the tree is predicted slower than vanilla."""
    model_dir, checkpoint, stats, rows = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    _fp32_like(fingerprint).save(tmp_path / "latency-cpu-onnxruntime.json")
    stats.save(tmp_path / "ppd-acceptance-int4.json")                         # fp32's statistics, int4's name
    _int4_like(fingerprint, variant="fp32").save(tmp_path / "latency-cpu-onnxruntime-int4.json")   # likewise
    args = ["build", "--gpu", "cpu", "--backend", "onnxruntime", "--variant", "int4", "--model-dir", str(model_dir),
            "--checkpoint", str(checkpoint), "--budgets", "4,8,16"]
    assert main(args) == 2
    assert "ppd-acceptance-int4.json was collected on the fp32 engine, not int4" in capsys.readouterr().err
    dataclasses.replace(stats, variant="int4").save(tmp_path / "ppd-acceptance-int4.json")
    assert main(args) == 2
    assert "latency-cpu-onnxruntime-int4.json was measured on the fp32 engine, not int4" in capsys.readouterr().err
    _int4_like(fingerprint).save(tmp_path / "latency-cpu-onnxruntime-int4.json")
    assert main([*args, "--profile", str(tmp_path / "latency-cpu-onnxruntime.json")]) == 2
    assert "measured on the fp32 engine, not int4" in capsys.readouterr().err
    assert not generated_dir(tmp_path).exists()                              # nothing written by a refusal
    assert main(args) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    generated = generated_dir(tmp_path)
    trees = load_ppd_trees(generated / "ppd-tree-cpu-onnxruntime-int4.json")
    meta = trees.metadata
    assert (meta["variant"], meta["backend"]) == ("int4", "onnxruntime")
    assert meta["search"]["statistics"] == "ppd-acceptance-int4.json"
    assert meta["search"]["profile"] == "latency-cpu-onnxruntime-int4.json"
    assert meta["expected_speedup"] < 1                                       # no gain is faked ...
    assert "SLOWER THAN VANILLA" in err and "T=2 already costs 2.03x T=1" in err   # ... and it is said
    for suffix in ("latency", "search", "trees"):
        assert (generated / f"ppd-tree-cpu-onnxruntime-int4-{suffix}.png").is_file()
    assert (generated / "latency-cpu-onnxruntime-variants.png").stat().st_size > 10_000
    assert not (generated / "ppd-tree-cpu-onnxruntime.json").exists()         # fp32's tree is another build
    # fp32's build on the same dir reads fp32's files, and its tree keeps fp32's name.
    assert main(["build", "--gpu", "cpu", "--backend", "onnxruntime", "--model-dir", str(model_dir), "--checkpoint",
                 str(checkpoint), "--budgets", "4,8,16", "--no-plots"]) == 0
    fp32 = load_ppd_trees(generated / "ppd-tree-cpu-onnxruntime.json").metadata
    assert fp32["variant"] == "fp32" and fp32["search"]["statistics"] == "ppd-acceptance.json"
    assert fp32["expected_speedup"] > 1
    # The variants' curves alone (python -m tools trees plot-latency).
    capsys.readouterr()
    plot = ["plot-latency", "--gpu", "cpu", "--checkpoint", str(checkpoint)]
    assert main([*plot, "--backend", "onnxruntime", "--out", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out
    assert "fp32 T=1 19.0 ms, T=2 1.05x; int4 T=1 9.8 ms, T=2 2.03x" in out
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert main([*plot, "--backend", "tensorrt"]) == 2
    assert "no tensorrt latency profile for --gpu cpu" in capsys.readouterr().err


def test_hybrid_build_refuses_ngram_statistics_of_another_variant(ppd_dir, tmp_path, capsys):
    from trees.ngram_stats import NgramStats, save_ngram_stats

    model_dir, checkpoint, stats, _ = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    _int4_like(fingerprint).save(tmp_path / "latency-cpu-onnxruntime-int4.json")
    dataclasses.replace(stats, variant="int4").save(tmp_path / "ppd-acceptance-int4.json")
    counts = (100, 50, 50, 50, 100, 50, 50, 50, 300)
    save_ngram_stats(tmp_path / "ngram-acceptance-int4.json", [NgramStats(8, 1000, counts, fingerprint)])
    args = ["build", "--gpu", "cpu", "--method", "hybrid", "--backend", "onnxruntime", "--variant", "int4",
            "--model-dir", str(model_dir), "--checkpoint", str(checkpoint), "--budgets", "4,8"]
    assert main(args) == 2
    assert "ngram-acceptance-int4.json was collected on the fp32 engine, not int4" in capsys.readouterr().err
    save_ngram_stats(tmp_path / "ngram-acceptance-int4.json",
                     [NgramStats(8, 1000, counts, fingerprint, variant="int4")])
    assert main(args) == 0, capsys.readouterr().err
    assert load_ppd_trees(generated_dir(tmp_path) / "hybrid-tree-cpu-onnxruntime-int4.json").metadata["variant"] == "int4"


def _tree_file(path, variant: str | None, fingerprint: str, rows, budget: int) -> None:
    """A valid N=2 tree file for the tiny checkpoint; `budget` tells files apart."""
    from trees.search import AcceptanceModel, SearchConfig, search

    steps = [(2, 0, 0), (2, 0, 1), (1, 0), (0,)] * 20
    model = AcceptanceModel.from_stats(AcceptanceStats(2, 1, 4, tuple(steps), fingerprint,
                                                       prompt_tokens_sha256(rows)), 4)
    trees, _ = search(model, lambda t: 1.0, budget, SearchConfig(budgets=(budget,), topk=4))
    meta = {"model_fingerprint": fingerprint, "checkpoint_sha256": prompt_tokens_sha256(rows), "budget": budget,
            **({} if variant is None else {"variant": variant})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.replace(trees, metadata=meta).to_json()))


def test_the_runtime_takes_the_variants_tree_then_fp32s(ppd_dir, tmp_path):
    """build_method (what Generator.from_pretrained / from_engine call) for onnxruntime int4: the int4
    tree, else fp32's for the backend (the whole order: tests/trees test_tree_lookup_per_variant...);
    another variant's tree is refused."""
    from runtime.methods import build_method

    model_dir, checkpoint, _, rows = ppd_dir
    fingerprint = model_fingerprint(model_dir)

    def tree_budget(variant="int4", **options):
        method = build_method("ppd", model_dir, 49152, 64, backend="onnxruntime", variant=variant,
                              checkpoint=str(checkpoint), **options)
        return method.proposer.trees.metadata.get("budget")

    _tree_file(tmp_path / "ppd-tree-cpu-onnxruntime.json", None, fingerprint, rows, 4)          # fp32's
    assert tree_budget() == 4 == tree_budget("fp32")
    _tree_file(generated_dir(tmp_path) / "ppd-tree-cpu-onnxruntime-int4.json", "int4", fingerprint, rows, 6)
    assert tree_budget() == 6 and tree_budget("fp32") == 4 and tree_budget("int8") == 4
    _tree_file(tmp_path / "int8-tree.json", "int8", fingerprint, rows, 8)
    with pytest.raises(TreeError, match="int8-tree.json: this tree was searched for the int8 engine.*loaded is int4"):
        tree_budget(tree=str(tmp_path / "int8-tree.json"))
    assert tree_budget("int8", tree=str(tmp_path / "int8-tree.json")) == 8


def test_int4_profile_build_and_runtime_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """On the tiny model: `profile --variant int4` times the int4 engine (made on demand from the fp32
    export), `build --variant int4` searches on it, and Generator.from_pretrained(variant="int4"),
    Generator.from_engine(<ppd-int4 dir>) and `export engine`'s tree install all take that tree."""
    import export.engine
    from export.__main__ import install_trees
    from export.engine import engine_tree_path
    from runtime import Generator

    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    fingerprint = model_fingerprint(tiny_model_dir)
    rows = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", rows, PPDConfig(3, 1), fingerprint,
                                    dtype=torch.float32)          # N = 3: the hand-picked tree the profile runs
    rng = np.random.default_rng(0)
    steps = [(3, *[int(r) for r in rng.choice([0, 0, 0, 1, 2, 4], size=3)]) for _ in range(300)]
    AcceptanceStats(3, 1, 4, tuple(steps), fingerprint, prompt_tokens_sha256(rows), variant="int4").save(
        tmp_path / "ppd-acceptance-int4.json")
    common = ["--gpu", "cpu", "--backend", "onnxruntime", "--variant", "int4", "--model-dir", str(tiny_model_dir),
              "--checkpoint", str(checkpoint)]
    assert main(["profile", *common, "--force", "--max-tokens", "4", "--context", "16", "--repeats", "2",
                 "--rounds", "1"]) == 0, capsys.readouterr().err
    profile = tmp_path / "latency-cpu-onnxruntime-int4.json"
    engine = Manifest.load(tmp_path / "artifacts" / "engines" / tiny_model_dir.name / "cpu" / "ppd-int4")
    assert json.loads(profile.read_text())["variant"] == "int4"
    assert json.loads(profile.read_text())["graph_sha256"] == engine.onnx.sha256     # the graph it timed
    assert main(["build", *common, "--budgets", "2,4", "--no-plots"]) == 0, capsys.readouterr().err
    tree = generated_dir(tmp_path) / "ppd-tree-cpu-onnxruntime-int4.json"
    searched = load_ppd_trees(tree)
    assert searched.metadata["variant"] == "int4" and searched.metadata["search"]["profile"] == profile.name

    gen = Generator.from_pretrained(tiny_model_dir, method="ppd", backend="onnxruntime", variant="int4",
                                    checkpoint=str(checkpoint), max_context=256)
    assert gen.proposer.trees == searched and gen.backend.manifest.dir.name == "ppd-int4"
    engine = gen.backend.manifest
    assert not engine_tree_path(engine).exists()                # a runtime-made dir has no installed tree:
    assert Generator.from_engine(engine.dir).proposer.trees == searched     # the variant's searched one
    install_trees(engine, "cpu", "onnxruntime")                 # what `make engine QUANT=int4` installs
    assert load_ppd_trees(engine_tree_path(engine)) == searched
    assert len(gen.generate("Tell me about the sea.", max_new_tokens=8).token_ids) == 8


def test_build_collects_missing_statistics_of_its_variant(ppd_dir, tmp_path, monkeypatch, capsys):
    """--stats-if-missing (`make tree`): the variant's acceptance and n-gram statistics are collected
    with the build's model, checkpoint, backend and variant when their files are missing, and not again
    (the collection itself is faked here; `stats`/`ngram-stats` run the real decode)."""
    from tools.treesearch import build as tree_build
    from trees.ngram_stats import NgramStats, save_ngram_stats

    model_dir, checkpoint, stats, _ = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    _int4_like(fingerprint).save(tmp_path / "latency-cpu-onnxruntime-int4.json")
    calls = []

    def fake_stats(cfg, argv):
        calls.append(("stats", cfg.method, cfg.backend, cfg.variant, cfg.checkpoint, Path(cfg.out).name))
        dataclasses.replace(stats, variant=cfg.variant).save(cfg.out)
        return 0

    def fake_ngram_stats(cfg, argv):
        calls.append(("ngram-stats", cfg.backend, cfg.variant, Path(cfg.out).name))
        save_ngram_stats(cfg.out, [NgramStats(8, 1000, (100, 50, 50, 50, 100, 50, 50, 50, 300), fingerprint,
                                              variant=cfg.variant)])
        return 0

    monkeypatch.setattr(tree_build, "cmd_stats", fake_stats)
    monkeypatch.setattr(tree_build, "cmd_ngram_stats", fake_ngram_stats)
    args = ["build", "--gpu", "cpu", "--method", "hybrid", "--backend", "onnxruntime", "--variant", "int4",
            "--model-dir", str(model_dir), "--checkpoint", str(checkpoint), "--budgets", "4,8", "--no-plots"]
    assert main(args) == 2 and "ppd-acceptance-int4.json does not exist" in capsys.readouterr().err
    assert calls == []                                                   # only when asked to
    assert main([*args, "--stats-if-missing"]) == 0, capsys.readouterr().err
    assert calls == [("stats", "ppd", "onnxruntime", "int4", str(checkpoint), "ppd-acceptance-int4.json"),
                     ("ngram-stats", "onnxruntime", "int4", "ngram-acceptance-int4.json")]
    assert main([*args, "--stats-if-missing"]) == 0 and len(calls) == 2   # there now: not collected again
    assert "nothing to do" in capsys.readouterr().out

    # Files that record the graph they were measured on: collected again once the engine dir holds another.
    dataclasses.replace(stats, variant="int4", graph_sha256="a" * 64).save(tmp_path / "ppd-acceptance-int4.json")
    save_ngram_stats(tmp_path / "ngram-acceptance-int4.json", [NgramStats(
        8, 1000, (100, 50, 50, 50, 100, 50, 50, 50, 300), fingerprint, variant="int4", graph_sha256="a" * 64)])
    monkeypatch.setattr(tree_build, "engine_graph_now", lambda cfg, graph: "a" * 64)
    assert main([*args, "--stats-if-missing"]) == 0 and len(calls) == 2   # the same graph: current
    monkeypatch.setattr(tree_build, "engine_graph_now", lambda cfg, graph: "b" * 64)
    assert main([*args, "--stats-if-missing"]) == 0, capsys.readouterr().err
    assert [c[0] for c in calls[2:]] == ["stats", "ngram-stats"]
    assert "measured on graph aaaaaaaaaaaa, but the engine dir now holds graph bbbbbbbbbbbb" in capsys.readouterr().out


def test_build_measures_again_a_profile_of_another_graph(ppd_dir, tmp_path, monkeypatch, capsys):
    """--profile-if-missing (`make tree`): a measured profile recording another graph than the engine dir
    holds now (the engine was rebuilt, e.g. by a new exporter) is measured again; one of the same graph
    is kept (the measuring itself is faked here; `profile` above times the real engine)."""
    from tools.treesearch import build as tree_build

    model_dir, checkpoint, stats, _ = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    dataclasses.replace(_int4_like(fingerprint), graph_sha256="a" * 64).save(
        tmp_path / "latency-cpu-onnxruntime-int4.json")
    dataclasses.replace(stats, variant="int4").save(tmp_path / "ppd-acceptance-int4.json")
    measured = []

    def fake_measure(cfg):
        measured.append((cfg.method, cfg.variant))
        return dataclasses.replace(_int4_like(fingerprint), graph_sha256="b" * 64).save(cfg.out)

    monkeypatch.setattr(tree_build, "measure_profile", fake_measure)
    monkeypatch.setattr(tree_build, "engine_graph_now", lambda cfg, graph: "b" * 64 if graph == "ppd" else None)
    args = ["build", "--gpu", "cpu", "--backend", "onnxruntime", "--variant", "int4", "--model-dir", str(model_dir),
            "--checkpoint", str(checkpoint), "--budgets", "2,4", "--no-plots"]
    assert main(args) == 0 and measured == []                     # without --profile-if-missing: never measured
    assert main([*args, "--profile-if-missing"]) == 0, capsys.readouterr().err
    assert measured == [("ppd", "int4")]
    assert "measured on graph aaaaaaaaaaaa, but the engine dir now holds graph bbbbbbbbbbbb" in capsys.readouterr().out
    assert main([*args, "--profile-if-missing"]) == 0 and measured == [("ppd", "int4")]   # now current


def test_build_measures_again_a_profile_of_another_cpu(ppd_dir, tmp_path, monkeypatch, capsys):
    """CPUs share the device key "cpu" and differ in the vector extensions their kernels use: a CPU
    profile recording others than this CPU has is measured again by --profile-if-missing (`make tree`),
    and without it used with a warning; one recording none (older files) counts as current."""
    from tools.treesearch import build as tree_build

    model_dir, checkpoint, stats, _ = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    profile = tmp_path / "latency-cpu-onnxruntime-int4.json"
    dataclasses.replace(_int4_like(fingerprint), cpu_isa="avx2 fma avx512f").save(profile)
    dataclasses.replace(stats, variant="int4").save(tmp_path / "ppd-acceptance-int4.json")
    measured = []

    def fake_measure(cfg):
        measured.append(cfg.variant)
        return dataclasses.replace(_int4_like(fingerprint), cpu_isa=tree_build.cpu_isa()).save(cfg.out)

    monkeypatch.setattr(tree_build, "measure_profile", fake_measure)
    monkeypatch.setattr(tree_build, "cpu_isa", lambda: "avx2 fma")
    monkeypatch.setattr(tree_build, "engine_graph_now", lambda cfg, graph: None)
    args = ["build", "--gpu", "cpu", "--backend", "onnxruntime", "--variant", "int4", "--model-dir", str(model_dir),
            "--checkpoint", str(checkpoint), "--budgets", "2,4", "--no-plots"]
    assert main(args) == 0 and measured == []                     # without --profile-if-missing: never measured
    assert "measured on a CPU with avx2 fma avx512f, this one has avx2 fma" in capsys.readouterr().err
    assert main([*args, "--profile-if-missing"]) == 0, capsys.readouterr().err
    assert measured == ["int4"]
    assert "measured on a CPU with avx2 fma avx512f, this one has avx2 fma: measuring it again" in capsys.readouterr().out
    assert main([*args, "--profile-if-missing"]) == 0 and measured == ["int4"]   # now current
    dataclasses.replace(_int4_like(fingerprint), cpu_isa=None).save(profile)   # a file from before the field
    assert main([*args, "--profile-if-missing"]) == 0 and measured == ["int4"]
    # The tree records the CPU it was searched for (the runtime warns on another: tests/runtime/test_devices.py).
    dataclasses.replace(_int4_like(fingerprint), cpu_isa="avx2 fma").save(profile)
    assert main([*args, "--out", str(tmp_path / "tree.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "tree.json").read_text())["cpu_isa"] == "avx2 fma"


def test_statistics_calibrate_on_given_prompts(tiny_model_dir, tmp_path, capsys):
    """`ngram-stats --prompts FILE`: the workload's own prompts instead of ShareGPT's, recorded as the calibration."""
    prompts = tmp_path / "workload.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"def f{i}(x):\n    return x + {i}"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "ngram.json"
    assert main(["ngram-stats", "--model-dir", str(tiny_model_dir), "--prompts", str(prompts), "--num-prompts", "2",
                 "--max-new-tokens", "8", "--max-depth", "2", "--out", str(out)]) == 0
    sources = json.loads(out.read_text())["sources"]
    assert {s["calibration"] for s in sources} == {f"--prompts {prompts} (3 prompts, first user turn, in file order)"}
    assert {s["num_prompts"] for s in sources} == {2}
    assert main(["ngram-stats", "--model-dir", str(tiny_model_dir), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "neither mtbench nor humaneval nor an existing JSONL file" in capsys.readouterr().err


def test_a_mix_of_prompt_sets_is_recorded_as_interleaved():
    from tools.treesearch.measure import calibration_source

    prompts, described = calibration_source("mtbench[2::40]+humaneval[20:22]")
    assert described == "--prompts mtbench[2::40]+humaneval[20:22] (4 prompts, first user turn, its + parts interleaved)"
    assert [p.startswith("Complete the following") for p in prompts] == [False, True, False, True]
    assert calibration_source("humaneval[20:22]")[1].endswith("(2 prompts, first user turn, in file order)")


def test_predict_evaluates_a_built_tree_on_other_statistics(ppd_dir, tmp_path, capsys):
    """predict on the statistics a tree was searched on gives the file's own expectation; on other
    statistics (a workload whose guesses are right more often) it gives theirs; mismatches are refused."""
    from trees.ngram_stats import NgramStats, save_ngram_stats

    model_dir, checkpoint, stats, rows = ppd_dir
    fingerprint = model_fingerprint(model_dir)
    save_ngram_stats(tmp_path / "ngram-acceptance.json",
                     [NgramStats(8, 1000, (100, 50, 50, 50, 100, 50, 50, 50, 300), fingerprint)])
    assert main(["build", "--gpu", "cpu", "--method", "hybrid", "--model-dir", str(model_dir), "--checkpoint",
                 str(checkpoint), "--budgets", "4,8"]) == 0, capsys.readouterr().err
    tree = generated_dir(tmp_path) / "hybrid-tree-cpu-torch.json"
    expected = load_ppd_trees(tree).metadata["expected_mean_accepted"]
    args = ["predict", "--tree", str(tree), "--stats", str(tmp_path / "ppd-acceptance.json")]
    assert main(args + ["--ngram-stats", str(tmp_path / "ngram-acceptance.json")]) == 0
    assert f": {expected:.3f} tokens/step on" in capsys.readouterr().out
    easier = dataclasses.replace(stats, steps=tuple((2, 0, 0) for _ in range(300)), calibration="all right")
    easier.save(tmp_path / "easy.json")
    save_ngram_stats(tmp_path / "never.json", [NgramStats(8, 1000, (0,) * 9, fingerprint)])

    def predicted(stats_file: str, ngram_file: str) -> float:
        assert main(["predict", "--tree", str(tree), "--stats", str(tmp_path / stats_file), "--ngram-stats",
                     str(tmp_path / ngram_file)]) == 0
        out = capsys.readouterr().out
        return float(out.split(": ")[1].split(" tokens/step")[0])

    assert predicted("easy.json", "ngram-acceptance.json") > expected              # PPD's guesses always right
    assert predicted("ppd-acceptance.json", "never.json") < expected               # the n-gram source never proposes
    assert main(["predict", "--tree", str(tree), "--stats", str(tmp_path / "easy.json")]) == 2
    assert "needs n-gram statistics" in capsys.readouterr().err
    assert main(["predict", "--tree", str(tree), "--stats", str(tmp_path / "easy.json"), "--ngram-stats",
                 str(tmp_path / "never.json")]) == 0 and "(all right)" in capsys.readouterr().out
    other = dataclasses.replace(stats, model_fingerprint="0" * 16)
    other.save(tmp_path / "other.json")
    assert main(["predict", "--tree", str(tree), "--stats", str(tmp_path / "other.json")]) == 2
    assert "collect them with that model" in capsys.readouterr().err
