"""Acceptance statistics, latency profiles, tree metadata and identity, device names: round trips and refusals."""

import json

import numpy as np
import pytest

from trees import PPDTreeSet, TreeError, check_tree_identity, load_ppd_trees, prompt_tokens_sha256
from trees.devices import DeviceMismatchError, check_device, device_key, find_device_tree, tree_filename
from trees.latency import LatencyProfile, ProfileError, load_profile, monotone_fit
from trees.stats import AcceptanceStats, StatsError, load_stats

K = 4


def make_stats(steps, **extra) -> AcceptanceStats:
    return AcceptanceStats(num_prompt_tokens=2, ensemble=1, topk=K, steps=tuple(steps), model_fingerprint="model-a",
                           checkpoint_sha256="ckpt-a", **extra)


def test_conditional_counts_only_steps_whose_shallower_depths_were_in_the_top_k():
    stats = make_stats([(2, 0, 1), (2, 0, K), (2, K, 0), (2, 1), (1, 0), (0,)])
    hits, trials = stats.counts()
    # depth 1 in state 2: ranks 0, 0, miss, 1 -> 4 trials; depth 2 only after a depth-1 hit: 1 and miss
    assert trials[2].tolist() == [4, 2] and hits[2, 0].tolist() == [2, 1, 0, 0] and hits[2, 1].tolist() == [0, 1, 0, 0]
    assert trials[1].tolist() == [1, 0]
    p = stats.conditional(shrinkage=0)
    assert p[2, 0].tolist() == [0.5, 0.25, 0, 0] and p[2, 1].tolist() == [0, 0.5, 0, 0]
    # state 1 has one observation; shrinkage pulls it towards the pooled depth-1 estimate (3/5 rank 0)
    shrunk = stats.conditional(shrinkage=5)
    assert shrunk[1, 0, 0] == pytest.approx((1 + 5 * 3 / 5) / (1 + 5))
    assert shrunk[0, 1, 1] == pytest.approx(1 / 2)  # no data in state 0: the pooled estimate


def test_stats_round_trip_and_identity(tmp_path):
    stats = make_stats([(2, 0, 1), (2, K), (1,)], calibration="sharegpt calibration", num_prompts=3)
    path = stats.save(tmp_path / "stats.json")
    assert load_stats(path) == stats
    assert json.loads(path.read_text())["summary"]["top1_per_depth"] == [0.5, 0.0]
    stats.check_identity("model-a", "ckpt-a")
    with pytest.raises(StatsError, match="for model model-a"):
        stats.check_identity("model-b", "ckpt-a")
    with pytest.raises(StatsError, match="retrained"):
        stats.check_identity("model-a", "ckpt-b")


@pytest.mark.parametrize("row", [(3, 0), (1, 0, 0), (2, K + 1), ()])
def test_bad_step_records_are_refused(row):
    with pytest.raises(StatsError, match="bad step record"):
        make_stats([row])


def test_profile_round_trip_and_monotone_latency(tmp_path):
    profile = LatencyProfile(device_key="nvidia-h100-80gb-hbm3", device_name="NVIDIA H100 80GB HBM3",
                             backend="onnxruntime", sizes=(1, 2, 4, 8), seconds=(0.010, 0.012, 0.011, 0.020),
                             repeats=10, context=300, model_fingerprint="model-a",
                             versions=(("onnxruntime", "1.31.1"), ("cuda", "12.8")))
    path = profile.save(tmp_path / "p.json")
    loaded = load_profile(path)
    assert loaded == profile and dict(loaded.versions)["cuda"] == "12.8"
    # 12 ms at T=2 then 11 ms at T=4 is noise: the fit pools them, and never decreases
    assert loaded.fitted.tolist() == pytest.approx([0.010, 0.0115, 0.0115, 0.020])
    assert loaded.latency(3) == pytest.approx(0.0115) and loaded.latency(6) == pytest.approx(0.01575)
    with pytest.raises(ProfileError, match="outside the profiled sizes"):
        loaded.latency(9)


def test_a_cpu_profile_records_its_vector_extensions(tmp_path):
    """CPUs share the device key "cpu"; a CPU profile records the extensions its kernels ran on, and one
    written before the field loads with None (counted as current)."""
    profile = LatencyProfile("cpu", "cpu: AMD EPYC (2 cores, 2 threads; avx2 fma)", "onnxruntime", (1, 2),
                             (0.010, 0.011), 3, 300, "m", cpu_isa="avx2 fma")
    path = profile.save(tmp_path / "p.json")
    assert load_profile(path) == profile and json.loads(path.read_text())["cpu_isa"] == "avx2 fma"
    data = json.loads(path.read_text())
    del data["cpu_isa"]
    path.write_text(json.dumps(data))
    assert load_profile(path).cpu_isa is None


def test_monotone_fit_is_the_identity_on_increasing_data_and_never_decreases():
    values = np.array([1.0, 2.0, 2.5, 4.0])
    assert monotone_fit(values).tolist() == values.tolist()
    noisy = np.random.default_rng(0).normal(size=50).cumsum()
    assert (np.diff(monotone_fit(noisy)) >= 0).all()


def test_profile_needs_sizes_from_one():
    with pytest.raises(ProfileError, match="start at 1"):
        LatencyProfile("cpu", "cpu: x", "torch", (2, 4), (0.1, 0.2), 3, 300, "m")


TREE = {"num_prompt_tokens": 1, "topk": 2, "trees": {
    "1": [{"path": [], "prompt_tokens": 1}, {"path": [0], "prompt_tokens": 1}, {"path": [1], "prompt_tokens": 0}],
    "0": [{"path": [], "prompt_tokens": 1}]}}


def test_tree_metadata_round_trips_and_old_files_still_load(tmp_path):
    searched = {"format": "ppdeploy-ppd-tree", "model_fingerprint": "model-a", "checkpoint_sha256": "ckpt-a",
                "device": "NVIDIA H100 80GB HBM3", "backend": "onnxruntime", "budget": 5,
                "expected_mean_accepted": 1.7, "expected_speedup": 1.4, **TREE}
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(searched))
    trees = load_ppd_trees(path)
    assert trees.metadata["expected_speedup"] == 1.4 and trees.metadata["budget"] == 5
    assert trees.to_json() == searched
    assert trees == PPDTreeSet.from_json(TREE)  # metadata is not part of the tree's identity
    assert PPDTreeSet.from_json(TREE).metadata == {}


def test_tree_for_another_model_or_checkpoint_is_refused():
    trees = PPDTreeSet.from_json({"model_fingerprint": "model-a", "checkpoint_sha256": "ckpt-a", **TREE})
    check_tree_identity(trees, "model-a", "ckpt-a")
    with pytest.raises(TreeError, match="built for model model-a"):
        check_tree_identity(trees, "model-b", "ckpt-a")
    with pytest.raises(TreeError, match="built for checkpoint tensors ckpt-a"):
        check_tree_identity(trees, "model-a", "ckpt-b")
    check_tree_identity(PPDTreeSet.from_json(TREE), "any", "any")  # hand-picked trees carry no identity


def test_prompt_tokens_hash_matches_the_onnx_manifest_hash():
    import torch

    from export.methods import tensor_sha256

    rows = torch.randn(3, 8)
    assert prompt_tokens_sha256(rows.numpy()) == tensor_sha256(rows)
    assert prompt_tokens_sha256(rows) == tensor_sha256(rows)
    assert prompt_tokens_sha256(rows.numpy() + 1) != tensor_sha256(rows)


@pytest.mark.parametrize("requested, kind, name", [
    ("h100", "cuda", "NVIDIA H100 80GB HBM3"), ("H100", "cuda", "NVIDIA H100 80GB HBM3"),
    ("nvidia-h100", "cuda", "NVIDIA H100 80GB HBM3"), ("a100", "cuda", "NVIDIA A100-SXM4-80GB"),
    ("cpu", "cpu", "cpu: Intel(R) Xeon(R) Processor @ 2.80GHz (2 cores, 2 threads)"),
])
def test_matching_device_names(requested, kind, name):
    check_device(requested, kind, name)


@pytest.mark.parametrize("requested, kind, name, message", [
    ("h100", "cuda", "NVIDIA H200", "does not match the GPU present"),
    ("h10", "cuda", "NVIDIA H100 80GB HBM3", "does not match the GPU present"),
    ("h100", "cpu", "cpu: Intel Xeon", "uses the CPU"),
    ("cpu", "cuda", "NVIDIA H100 80GB HBM3", "--gpu cpu was given"),
])
def test_mismatched_device_names_are_errors(requested, kind, name, message):
    with pytest.raises(DeviceMismatchError, match=message):
        check_device(requested, kind, name)


def test_device_keys_and_tree_lookup(tmp_path):
    assert device_key("cuda", "NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_key("cpu", "cpu: Intel Xeon (2 cores)") == "cpu"
    fallback = tmp_path / "ppd-tree-cpu.json"
    assert find_device_tree(tmp_path, "cpu", "torch", "ppd", fallback) == fallback
    (tmp_path / tree_filename("cpu", "onnxruntime", "ppd")).write_text("{}")
    assert find_device_tree(tmp_path, "cpu", "torch", "ppd", fallback).name == "ppd-tree-cpu-onnxruntime.json"
    (tmp_path / tree_filename("cpu", "torch", "ppd")).write_text("{}")
    assert find_device_tree(tmp_path, "cpu", "torch", "ppd", fallback).name == "ppd-tree-cpu-torch.json"
    assert find_device_tree(tmp_path, "nvidia-h100-80gb-hbm3", "torch", "ppd", fallback) == fallback
    # ht trees live in the same directory and never stand in for ppd's (or the other way round)
    assert find_device_tree(tmp_path, "cpu", "torch", "ht", fallback) == fallback
    (tmp_path / tree_filename("cpu", "torch", "ht")).write_text("{}")
    assert find_device_tree(tmp_path, "cpu", "onnxruntime", "ht", fallback).name == "ht-tree-cpu-torch.json"


# --- engine variants (export/quantize.py): names, records, refusals ---------------------------------

def test_file_names_per_variant_keep_fp32_names():
    from trees.devices import profile_filename, variant_latencies_filename

    assert profile_filename("cpu", "onnxruntime") == "latency-cpu-onnxruntime.json"          # committed names
    assert profile_filename("cpu", "onnxruntime", "fp32") == "latency-cpu-onnxruntime.json"
    assert tree_filename("cpu", "onnxruntime", "ppd", "fp32") == "ppd-tree-cpu-onnxruntime.json"
    assert profile_filename("cpu", "onnxruntime", "int4") == "latency-cpu-onnxruntime-int4.json"
    assert tree_filename("cpu", "onnxruntime", "hybrid", "int8") == "hybrid-tree-cpu-onnxruntime-int8.json"
    assert variant_latencies_filename("cpu", "onnxruntime") == "latency-cpu-onnxruntime-variants.png"


def _profile(variant: str | None = None, **extra) -> LatencyProfile:
    kwargs = {} if variant is None else {"variant": variant}
    return LatencyProfile("cpu", "cpu: x", "onnxruntime", (1, 2, 4), (0.010, 0.020, 0.022), 3, 300, "model-a",
                          **kwargs, **extra)


def test_profile_records_its_variant_and_is_refused_for_another(tmp_path):
    int4 = _profile("int4")
    path = int4.save(tmp_path / "latency-cpu-onnxruntime-int4.json")
    assert json.loads(path.read_text())["variant"] == "int4" and load_profile(path) == int4
    assert int4.engine == "onnxruntime int4" and _profile().engine == "onnxruntime"
    load_profile(path).check_variant("int4", path)
    with pytest.raises(ProfileError, match="measured on the int4 engine, not fp32.*--variant fp32"):
        load_profile(path).check_variant("fp32", path)
    # A profile from before the field was measured on fp32 weights.
    old = {k: v for k, v in _profile().to_json().items() if k != "variant"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_profile(tmp_path / "old.json").variant == "fp32"
    with pytest.raises(ProfileError, match="measured on the fp32 engine, not int4"):
        load_profile(tmp_path / "old.json").check_variant("int4", tmp_path / "old.json")


def test_statistics_record_their_variant_and_are_refused_for_another(tmp_path):
    from trees.ngram_stats import NgramStats, load_ngram_stats, save_ngram_stats

    stats = make_stats([(2, 0, 1), (1,)], variant="int4")
    path = stats.save(tmp_path / "ppd-acceptance-int4.json")
    assert load_stats(path).variant == "int4"
    load_stats(path).check_variant("int4", path)
    with pytest.raises(StatsError, match="collected on the int4 engine, not int8.*--variant int8"):
        load_stats(path).check_variant("int8", path)
    old = json.loads(path.read_text())
    del old["variant"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_stats(tmp_path / "old.json").variant == "fp32"
    ngram = save_ngram_stats(tmp_path / "ngram-acceptance-int4.json",
                             [NgramStats(2, 10, (1, 2, 3), "model-a", variant="int4")])
    assert [s.variant for s in load_ngram_stats(ngram)] == ["int4"]


def test_tree_of_another_variant_is_refused_and_fp32_trees_run_on_every_variant():
    int4 = PPDTreeSet.from_json({"model_fingerprint": "model-a", "checkpoint_sha256": "ckpt-a", "variant": "int4",
                                 **TREE})
    check_tree_identity(int4, "model-a", "ckpt-a", "int4")
    for engine in ("fp32", "int8"):
        with pytest.raises(TreeError, match=f"searched for the int4 engine.*loaded is {engine}"):
            check_tree_identity(int4, "model-a", "ckpt-a", engine)
    with pytest.raises(TreeError, match="searched for the int4 engine"):
        check_tree_identity(int4, "model-a", "ckpt-a")          # the default engine is fp32
    fp32 = PPDTreeSet.from_json({"model_fingerprint": "model-a", "checkpoint_sha256": "ckpt-a", **TREE})
    for engine in ("fp32", "int8", "int4"):                      # no variant recorded: fp32's, the fallback
        check_tree_identity(fp32, "model-a", "ckpt-a", engine)


def test_tree_lookup_per_variant_falls_back_to_fp32(tmp_path):
    generated, committed = tmp_path / "generated", tmp_path / "committed"
    for d in (generated, committed):
        d.mkdir()
    dirs, fallback = (generated, committed), tmp_path / "hand-picked.json"

    def find(backend="onnxruntime", variant="int4"):
        return find_device_tree(dirs, "cpu", backend, "ppd", fallback, variant)

    # A variant's tree never stands in for fp32, on its backend or another one.
    (committed / tree_filename("cpu", "onnxruntime", "ppd", "int8")).write_text("{}")
    assert find(variant="fp32") == fallback and find("torch", "fp32") == fallback and find() == fallback
    (committed / tree_filename("cpu", "torch", "ppd")).write_text("{}")          # fp32, another backend
    assert find() == committed / "ppd-tree-cpu-torch.json"
    (generated / tree_filename("cpu", "onnxruntime", "ppd")).write_text("{}")    # fp32, this backend
    assert find() == generated / "ppd-tree-cpu-onnxruntime.json"
    (committed / tree_filename("cpu", "onnxruntime", "ppd", "int4")).write_text("{}")   # the variant's own wins
    assert find() == committed / "ppd-tree-cpu-onnxruntime-int4.json"
    (generated / tree_filename("cpu", "onnxruntime", "ppd", "int4")).write_text("{}")
    assert find() == generated / "ppd-tree-cpu-onnxruntime-int4.json"
    assert find(variant="int8") == committed / "ppd-tree-cpu-onnxruntime-int8.json"
    assert find(variant="fp32") == generated / "ppd-tree-cpu-onnxruntime.json"
    assert find("torch", "fp32") == committed / "ppd-tree-cpu-torch.json"
