"""The roofline latency model: the GPU table, the step's bytes and FLOPs, and the profile it gives."""

import json
from pathlib import Path

import pytest

from trees.devices import device_key
from trees.latency import LatencyProfile, ProfileError, load_profile
from trees.roofline import (GPUS, ModelShape, RooflineError, compare_profiles, format_comparison, launch_overhead,
                            lookup_gpu, roofline_profile, step_cost)

# SmolLM2-135M-Instruct's config.json (the fields the roofline reads).
SMOLLM2_135M = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
COMMITTED = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture()
def smollm2() -> ModelShape:
    return ModelShape.from_config(SMOLLM2_135M)


def test_lookup_by_alias_full_name_or_device_key():
    assert lookup_gpu("h100").name == "NVIDIA H100 80GB HBM3"              # the SXM part; PCIe says so
    assert lookup_gpu("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 80GB HBM3"
    assert lookup_gpu("H100 PCIe").name == "NVIDIA H100 PCIe"
    assert lookup_gpu("nvidia-h200").name == "NVIDIA H200"                  # a device key (file names)
    assert lookup_gpu("a100").memory_bandwidth == 2039e9
    for gpu in GPUS:                                                        # the name torch reports finds its row
        assert lookup_gpu(gpu.name) is gpu and lookup_gpu(device_key("cuda", gpu.name)) is gpu


def test_unknown_gpu_is_a_clear_error_listing_the_known_ones():
    with pytest.raises(RooflineError, match="not in the table") as caught:
        lookup_gpu("b200")
    assert all(gpu.name in str(caught.value) for gpu in GPUS)
    assert isinstance(caught.value, ProfileError)      # the CLIs report it as a bad input, exit 2
    with pytest.raises(RooflineError, match="matches several"):
        lookup_gpu("nvidia")


def test_the_parameter_count_is_the_model_s(smollm2):
    assert smollm2.head_dim == 64 and smollm2.kv_heads == 3
    assert 134e6 < smollm2.weight_params < 135e6          # SmolLM2-135M: 134.5M with tied embeddings


def test_profile_is_monotone_and_marked_modelled(smollm2):
    profile = roofline_profile(smollm2, lookup_gpu("h200"), "onnxruntime", "fp", context=300)
    assert profile.sizes == tuple(range(1, 65)) and profile.source == "roofline"
    assert profile.device_key == "nvidia-h200" and profile.device_name == "NVIDIA H200"
    assert all(b > a for a, b in zip(profile.seconds, profile.seconds[1:]))
    record = dict(profile.roofline)
    assert record["gpu"] == "NVIDIA H200" and record["dtype"] == "fp16" and record["memory_bandwidth_gb_s"] == 4800
    data = json.loads(json.dumps(profile.to_json()))     # seconds rounded to 0.1 us, as measured ones
    assert data["source"] == "roofline" and LatencyProfile.from_json(data).to_json() == profile.to_json()


def test_a_small_model_is_bandwidth_bound_at_small_T(smollm2):
    h200 = lookup_gpu("h200")
    one = step_cost(smollm2, h200, tokens=1, context=300)
    assert one.bound == "memory" and one.compute_seconds < one.memory_seconds / 100
    weights = 2 * smollm2.weight_params / h200.memory_bandwidth              # fp16 weights read once
    assert weights < one.memory_seconds < 1.05 * weights                     # + the KV cache, 2.6% here
    assert step_cost(smollm2, h200, tokens=64, context=300).bound == "memory"
    # Launch overhead dominates a 135M step: T=64 costs about what T=1 does, as the paper's GPUs show.
    assert one.overhead_seconds == launch_overhead(smollm2) > 10 * one.memory_seconds
    profile = roofline_profile(smollm2, h200, "onnxruntime", "fp", context=300)
    assert profile.latency(64) / profile.latency(1) < 1.01


@pytest.mark.parametrize("name", ["h200", "a100", "l4", "rtx 4090"])
def test_compute_bound_past_the_ridge_point(smollm2, name):
    """An fp16 step reads ~2 bytes and does ~2T FLOPs per weight: it turns compute-bound near
    T = peak / bandwidth (attention FLOPs pull it a little earlier)."""
    gpu = lookup_gpu(name)
    bounds = [step_cost(smollm2, gpu, t, context=300).bound for t in range(1, 1001)]
    crossover = bounds.index("compute") + 1
    assert all(b == "memory" for b in bounds[:crossover - 1]) and all(b == "compute" for b in bounds[crossover - 1:])
    ridge = gpu.fp16_flops / gpu.memory_bandwidth
    assert 0.85 * ridge < crossover < 1.05 * ridge
    big = step_cost(smollm2, gpu, 1000, context=300)
    assert big.seconds == pytest.approx(big.compute_seconds + big.overhead_seconds)


def test_committed_measured_profiles_still_load_as_measured():
    for path in sorted(COMMITTED.glob("latency-*.json")):
        raw = json.loads(path.read_text())
        profile = load_profile(path)
        assert profile.source == raw.get("source", "measured") and not profile.roofline
        written = profile.to_json()
        assert written.pop("source") == profile.source
        assert {k: v for k, v in written.items() if k in raw} == {k: v for k, v in raw.items() if k != "source"}


def test_a_profile_source_is_measured_or_roofline_with_its_record():
    common = dict(device_key="x", device_name="x", backend="torch", sizes=(1, 2), seconds=(1.0, 2.0), repeats=1,
                  context=0, model_fingerprint="fp")
    with pytest.raises(ProfileError, match="source"):
        LatencyProfile(**common, source="roofline")              # modelled, but from what?
    with pytest.raises(ProfileError, match="source"):
        LatencyProfile(**common, source="guessed")
    assert LatencyProfile(**common).source == "measured"


def test_compare_profiles_reports_each_size(smollm2):
    modelled = roofline_profile(smollm2, lookup_gpu("h200"), "torch", "fp", context=300)
    sizes = (1, 2, 4, 8, 16)
    measured = LatencyProfile("nvidia-h200", "NVIDIA H200", "torch", sizes,
                              tuple(2 * modelled.latency(t) for t in sizes), 10, 300, "fp")
    points = compare_profiles(modelled, measured)
    assert [p.tokens for p in points] == list(sizes)
    assert all(p.ratio == pytest.approx(2.0) and p.measured_ms == pytest.approx(2 * p.modelled_ms) for p in points)
    table = format_comparison(points).splitlines()
    assert "measured/modelled" in table[0] and len(table) == 1 + len(sizes)
