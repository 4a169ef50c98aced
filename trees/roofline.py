"""A roofline latency model of one decode step on a GPU this machine does not have: a provisional
latency profile for the tree search, marked "roofline" (modelled), never "measured".

One step scores T tokens (candidates + prompt tokens) over a committed context of S entries:

    bytes  = weights read once (every matmul weight and the LM head, at the dtype's width)
           + KV cache read (2 L S Hkv D) + new KV written (2 L T Hkv D) + logits written (T V)
    flops  = 2 * matmul params * T  +  attention 4 L H D T (S + T)   (QK^T and AV over the tree's columns)
    time   = max(bytes / bandwidth, flops / peak)  +  overhead

Activations between kernels are left out: at batch 1 they are T x hidden, kilobytes against the
weights' hundreds of megabytes. Embedding rows read by the lookup are T x hidden, likewise.

The overhead is the cost of launching the step's kernels, which the two roofs do not see: a small
model's step is a few hundred tiny kernels, each shorter than its launch, so the launch rate sets
the floor. We count KERNELS_PER_LAYER = 12 per decoder layer (RMSNorm, QKV GEMM, RoPE, KV
concat, attention, O GEMM + residual, RMSNorm, gate/up GEMM, SiLU*mul, down GEMM + residual: what
a fused engine such as TensorRT or onnxruntime's CUDA graph runs) plus KERNELS_PER_STEP = 4
(embedding, final norm, LM head, output copy), at LAUNCH_SECONDS = 4 us each: the middle of the
2-5 us a cudaLaunchKernel costs on a server host. It is added, not overlapped (an upper bound: a
launch queue that runs ahead hides part of it). For SmolLM2-135M that is 364 kernels, 1.46 ms,
against 56 us of weight reads on an H200: the modelled curve is nearly flat up to T = 64, which is
the paper's point about GPUs. torch eager costs several times more per op; `compare_profiles`
reports the modelled curve against a measured one so the gpu-check shows how far off this is.

The model is deliberately plain (no efficiency factors): a measured profile for the device always
replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from trees.devices import device_key
from trees.latency import ROOFLINE, LatencyProfile, ProfileError

KERNELS_PER_LAYER = 12
KERNELS_PER_STEP = 4
LAUNCH_SECONDS = 4e-6
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
DEFAULT_DTYPE = "fp16"      # GPU engines are exported in fp16 (export --dtype fp16)
DEFAULT_MAX_TOKENS = 64     # the engines' default max tree (export.manifest.DEFAULT_MAX_TREE)
ROOFLINE_REVISION = 1       # bump when the model's terms change: tree files hash their profile


class RooflineError(ProfileError):
    """A GPU not in the table, or a model config the roofline cannot read."""


@dataclass(frozen=True)
class GPUSpec:
    name: str                       # the name torch.cuda.get_device_name() reports for the part
    aliases: tuple[str, ...]        # what --gpu may say instead (matched as whole words)
    memory_bandwidth: float         # bytes/s, datasheet peak
    fp16_flops: float               # dense fp16/bf16 tensor-core FLOP/s (the datasheets quote 2x "with sparsity")
    fp32_flops: float               # fp32 FLOP/s on the CUDA cores (no TF32: our fp32 parity runs clear it)

    def peak_flops(self, dtype: str) -> float:
        return self.fp32_flops if dtype == "fp32" else self.fp16_flops


def _gpu(name: str, aliases: tuple[str, ...], bandwidth_gb_s: float, fp16_tflops: float, fp32_tflops: float) -> GPUSpec:
    return GPUSpec(name, aliases, bandwidth_gb_s * 1e9, fp16_tflops * 1e12, fp32_tflops * 1e12)


# NVIDIA datasheets (memory bandwidth GB/s; dense FP16/BF16 Tensor Core TFLOPS, i.e. half the
# "with sparsity" figure; FP32 TFLOPS):
#   A100 Tensor Core GPU datasheet (2021): 40GB SXM 1,555; 80GB SXM 2,039; 80GB PCIe 1,935; 312; 19.5
#   H100 Tensor Core GPU datasheet: SXM 3.35 TB/s, 1,979/2 = 989.5, 67; PCIe 2 TB/s, 1,513/2 = 756.5, 51;
#                                    NVL 3.9 TB/s, 1,671/2 = 835.5, 60
#   H200 Tensor Core GPU datasheet: SXM 4.8 TB/s, 1,979/2 = 989.5, 67; NVL 4.8 TB/s, 1,671/2 = 835.5, 60
#   L4 datasheet: 300 GB/s, 242/2 = 121, 30.3        L40S datasheet: 864 GB/s, 362.05 (733 sparse), 91.6
#   A10 datasheet: 600 GB/s, 250/2 = 125, 31.2       T4 datasheet: 320 GB/s, 65 (no sparsity), 8.1
#   V100 datasheet (SXM2): 900 GB/s, 125, 15.7
#   Ada Lovelace architecture whitepaper, RTX 4090: 1,008 GB/s; FP16 tensor with FP32 accumulate
#   165.2 dense (GeForce parts halve it; 330.3 is FP16-accumulate, which our matmuls do not use); 82.6
GPUS: tuple[GPUSpec, ...] = (
    _gpu("NVIDIA A100-SXM4-40GB", ("a100 40gb", "a100 sxm4 40gb"), 1555, 312, 19.5),
    _gpu("NVIDIA A100-SXM4-80GB", ("a100", "a100 80gb", "a100 sxm", "a100 sxm4 80gb"), 2039, 312, 19.5),
    _gpu("NVIDIA A100 80GB PCIe", ("a100 pcie", "a100 80gb pcie"), 1935, 312, 19.5),
    _gpu("NVIDIA H100 80GB HBM3", ("h100", "h100 sxm", "h100 sxm5"), 3350, 989.5, 67),
    _gpu("NVIDIA H100 PCIe", ("h100 pcie",), 2000, 756.5, 51),
    _gpu("NVIDIA H100 NVL", ("h100 nvl",), 3900, 835.5, 60),
    _gpu("NVIDIA H200", ("h200", "h200 sxm"), 4800, 989.5, 67),
    _gpu("NVIDIA H200 NVL", ("h200 nvl",), 4800, 835.5, 60),
    _gpu("NVIDIA L4", ("l4",), 300, 121, 30.3),
    _gpu("NVIDIA L40S", ("l40s",), 864, 362.05, 91.6),
    _gpu("NVIDIA A10", ("a10",), 600, 125, 31.2),
    _gpu("NVIDIA GeForce RTX 4090", ("rtx 4090", "rtx4090", "4090"), 1008, 165.2, 82.6),
    _gpu("Tesla T4", ("t4",), 320, 65, 8.1),
    _gpu("Tesla V100-SXM2-16GB", ("v100",), 900, 125, 15.7),
)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def lookup_gpu(name: str) -> GPUSpec:
    """The table row for `name`: a row's full name or alias (case and punctuation ignored: "h100",
    "NVIDIA H100 80GB HBM3", "H100-SXM"), else the one row whose name holds it as whole words.
    Unknown or ambiguous names raise RooflineError listing the known GPUs."""
    want = _words(name)
    for gpu in GPUS:
        if want and want in {_words(gpu.name), *map(_words, gpu.aliases)}:
            return gpu
    partial = [g for g in GPUS if want and f" {want} " in f" {_words(g.name)} "]
    if len(partial) == 1:
        return partial[0]
    known = ", ".join(f"{g.name} ({', '.join(g.aliases)})" for g in GPUS)
    problem = f"matches several ({', '.join(g.name for g in partial)})" if partial else "is not in the table"
    raise RooflineError(f"GPU {name!r} {problem}: the roofline model knows {known}; add a row with its datasheet "
                        f"figures to trees/roofline.py GPUS, or measure a profile on that GPU")


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a decoder's config (a Llama-style HF config.json)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelShape":
        try:
            heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
            return cls(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                       intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                       tied_embeddings=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise RooflineError(f"the roofline needs a Llama-style config (layers, heads, sizes): {exc!r}") from exc

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies by: the decoder layers' linear maps and the LM head."""
        attention = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden

    @property
    def weight_params(self) -> int:
        """Weights read per step: the matmul weights (the LM head is the embedding when tied), norms."""
        return self.matmul_params + (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class StepCost:
    bytes: float
    flops: float
    memory_seconds: float
    compute_seconds: float
    overhead_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds) + self.overhead_seconds

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds > self.memory_seconds else "memory"


def launch_overhead(shape: ModelShape) -> float:
    return (KERNELS_PER_LAYER * shape.layers + KERNELS_PER_STEP) * LAUNCH_SECONDS


def step_cost(shape: ModelShape, gpu: GPUSpec, tokens: int, context: int, dtype: str = DEFAULT_DTYPE) -> StepCost:
    """The roofline terms of one step of `tokens` tokens over `context` committed entries."""
    if dtype not in DTYPE_BYTES:
        raise RooflineError(f"dtype {dtype!r}: the roofline knows {sorted(DTYPE_BYTES)}")
    if tokens < 1 or context < 0:
        raise RooflineError(f"a step needs tokens >= 1 and context >= 0, got {tokens}, {context}")
    width = DTYPE_BYTES[dtype]
    kv_row = 2 * shape.layers * shape.kv_heads * shape.head_dim          # K and V entries of one position
    elements = shape.weight_params + kv_row * (context + tokens) + tokens * shape.vocab
    attention = 4 * shape.layers * shape.heads * shape.head_dim * tokens * (context + tokens)   # QK^T, AV
    flops = 2 * shape.matmul_params * tokens + attention
    return StepCost(bytes=float(elements * width), flops=float(flops),
                    memory_seconds=elements * width / gpu.memory_bandwidth,
                    compute_seconds=flops / gpu.peak_flops(dtype), overhead_seconds=launch_overhead(shape))


def roofline_profile(shape: ModelShape, gpu: GPUSpec, backend: str, model_fingerprint: str, context: int,
                     max_tokens: int = DEFAULT_MAX_TOKENS, dtype: str = DEFAULT_DTYPE) -> LatencyProfile:
    """The modelled profile of sizes 1..max_tokens, keyed like a measured one of that GPU (its
    device key is the slug of the name the GPU reports) and marked source "roofline"."""
    sizes = tuple(range(1, max_tokens + 1))
    record = {"revision": ROOFLINE_REVISION, "gpu": gpu.name, "dtype": dtype,
              "memory_bandwidth_gb_s": gpu.memory_bandwidth / 1e9, "peak_tflops": gpu.peak_flops(dtype) / 1e12,
              "overhead_ms": round(1e3 * launch_overhead(shape), 4),
              "bound_at_max_tokens": step_cost(shape, gpu, max_tokens, context, dtype).bound}
    return LatencyProfile(device_key=device_key("cuda", gpu.name), device_name=gpu.name, backend=backend, sizes=sizes,
                          seconds=tuple(step_cost(shape, gpu, t, context, dtype).seconds for t in sizes), repeats=0,
                          context=context, model_fingerprint=model_fingerprint, source=ROOFLINE,
                          roofline=tuple(record.items()))


@dataclass(frozen=True)
class CurvePoint:
    tokens: int
    modelled_ms: float
    measured_ms: float

    @property
    def ratio(self) -> float:
        """measured / modelled: > 1 where the roofline is optimistic."""
        return self.measured_ms / self.modelled_ms


def compare_profiles(modelled: LatencyProfile, measured: LatencyProfile,
                     sizes: tuple[int, ...] | None = None) -> list[CurvePoint]:
    """Per T (default: every size both cover): modelled and measured milliseconds (the measured
    one's monotone fit, what the search reads) and their ratio. For the gpu-check report."""
    top = min(modelled.max_tokens, measured.max_tokens)
    sizes = tuple(t for t in (sizes or measured.sizes) if t <= top)
    return [CurvePoint(t, 1e3 * modelled.latency(t), 1e3 * measured.latency(t)) for t in sizes]


def format_comparison(points: list[CurvePoint]) -> str:
    """A text table of `compare_profiles`, with each curve's T/T=1 shape (what picks the tree)."""
    base_model, base_measured = points[0].modelled_ms, points[0].measured_ms
    lines = ["    T  modelled ms  measured ms  measured/modelled  modelled T/T1  measured T/T1"]
    lines += [f"{p.tokens:>5}  {p.modelled_ms:>11.3f}  {p.measured_ms:>11.3f}  {p.ratio:>17.2f}  "
              f"{p.modelled_ms / base_model:>13.3f}  {p.measured_ms / base_measured:>13.3f}" for p in points]
    return "\n".join(lines)
