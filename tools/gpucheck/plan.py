"""The steps of `make gpu-check`, most wanted first, sized for one call of a borrowed GPU machine (a run
out of time drops the tail, reported as not run). Steps of one `group` run side by side: the tree
searches (host CPU work on the profile just measured) beside the CUDA tests (no timing).

    profile-bf16        step latency T = 1..64, each T a static step of its own (a CUDA graph), bf16
    tree-{ppd,ht,hybrid} the trees searched on that profile  | cuda-tests (the gpu-marked tests)
    bench-bf16          vanilla, ngram, ppd, hybrid, ht and the hf-compiled peer, MT-Bench x 10 +
                        HumanEval x 10 interleaved, 3 repeats: tokens/s, tokens per step, identical outputs
    bench-fp32          the same in fp32
    batch-bf16          aggregate tokens/s of vanilla and hybrid at B = 1, 4, 16, 64
    latency-baseline    the device's latency regression baseline (make latency-test)
    roofline            the datasheet roofline against the bf16 profile
    onnxruntime / TensorRT steps where their CUDA builds are installed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.paths import ARTIFACTS_DIR

TREE_METHODS = ("ppd", "ht", "hybrid")
BENCH_METHODS = "vanilla,ngram,ppd,hybrid,ht,hf-compiled"
PROMPT_SETS = ("mtbench", "humaneval")
DEADLINE_S = 360             # the whole run: one device call of at most 6 minutes
MIN_STEP_SECONDS = 20        # a step is not started with less left than this


@dataclass(frozen=True)
class Sizes:
    """How much each step measures: the full check, or a quick one that only exercises the script."""
    prompts: int = 10              # per prompt set
    new_tokens: int = 64
    repeats: int = 3               # interleaved; medians
    profile_max_tokens: int = 64
    profile_repeats: int = 12
    profile_rounds: int = 3
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)

    def prompts_spec(self) -> str:
        """MT-Bench and HumanEval interleaved (tools/bench/prompts.py), so every run holds both."""
        return "+".join(f"{name}[:{self.prompts}]" for name in PROMPT_SETS)


QUICK = Sizes(prompts=1, new_tokens=8, repeats=1, profile_max_tokens=8, profile_repeats=2, profile_rounds=1,
              batch_sizes=(1, 2))


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]          # run with this interpreter: python ...
    timeout_s: float
    skip: str | None = None        # why it cannot run here (then it is reported, not run)
    group: str | None = None       # steps of one group run side by side


def profile_path(out: Path, key: str, dtype: str = "bf16") -> Path:
    return out / f"latency-{key}-torch-{dtype}.json"


def plan(device: str, gpu: str, key: str, out: Path, sizes: Sizes, ort_skip: str | None = None,
         trt_skip: str | None = None) -> list[Step]:
    """The steps for the device present (`gpu`: its name, `key` its device key; `device` cuda or cpu);
    `ort_skip` / `trt_skip`: why onnxruntime's CUDA provider or TensorRT cannot run here (None: they can)."""
    cpu_run = None if device == "cuda" else "CPU run: this step needs CUDA"
    profile = profile_path(out, key)
    py = ("-m",)
    steps = [Step("profile-bf16", (*py, "tools", "trees", "profile", "--gpu", gpu, "--backend", "torch",
                                   "--device", device, "--dtype", "bf16", "--max-tokens", str(sizes.profile_max_tokens),
                                   "--repeats", str(sizes.profile_repeats), "--rounds", str(sizes.profile_rounds),
                                   "--out", str(profile), "--force"), 90)]   # quietness recorded, never refused
    for method in TREE_METHODS:
        steps.append(Step(f"tree-{method}", (*py, "tools", "trees", "build", "--method", method, "--gpu", gpu,
                                             "--backend", "torch", "--device", device, "--profile", str(profile),
                                             "--budgets", budgets(sizes.profile_max_tokens),
                                             "--out", str(out / f"{method}-tree-{key}-torch.json")), 60,
                          group="trees"))
    steps.append(Step("cuda-tests", (*py, "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests",
                                     "--ignore=tests/runtime/serving"), 120, cpu_run, group="trees"))
    prompts = sizes.prompts_spec()

    def bench(backend: str, dtype: str, skip: str | None, methods: str = BENCH_METHODS) -> Step:
        return Step(f"bench-{backend}-{dtype}" if backend != "torch" else f"bench-{dtype}",
                    (*py, "tools", "bench", "--backend", backend, "--device", device, "--dtype", dtype,
                     "--prompts", prompts, "--methods", methods, "--max-new-tokens", str(sizes.new_tokens),
                     "--repeats", str(sizes.repeats), "--trees", str(out),   # the trees just searched here
                     "--out", str(out / f"bench-{backend}-{dtype}.json")), 150, skip)

    steps += [bench("torch", "bf16", None), bench("torch", "fp32", None)]
    steps.append(Step("batch-bf16", (*py, "tools", "batch-bench", "--backend", "torch", "--device", device,
                                     "--dtype", "bf16", "--methods", "vanilla,hybrid", "--prompts", prompts,
                                     "--batch-sizes", ",".join(map(str, sizes.batch_sizes)),
                                     "--max-new-tokens", str(sizes.new_tokens), "--repeats", "1", "--trees", str(out),
                                     "--out", str(out / "batch-torch-bf16.json")), 90))
    steps.append(Step("latency-baseline", (*py, "tools", "latency-baseline", "--gpu", gpu, "--backend", "torch",
                                           "--device", device, "--force",
                                           "--out", str(out / f"regression-baseline-{key}-torch.json")), 90))
    steps.append(Step("roofline", (*py, "tools", "trees", "roofline", "--compare", str(profile),
                                   "--out", str(out / "roofline-vs-measured.json")), 20, cpu_run))
    steps.append(bench("onnxruntime", "fp32", ort_skip, "vanilla,ngram,ppd,hybrid,ht"))
    trt_dir = ARTIFACTS_DIR / "engines" / "gpu-check" / key / "ppd"   # engines are never committed
    steps.append(Step("tensorrt-engine", (*py, "export", "engine", "--target", gpu, "--method", "ppd",
                                          "--out", str(trt_dir)), 240, trt_skip))
    steps.append(Step("tensorrt-parity", (*py, "tools", "check", str(trt_dir)), 60, trt_skip))
    return steps


def budgets(max_tokens: int) -> str:
    """The search's fixed budgets up to the profiled size."""
    return ",".join(str(b) for b in (2, 4, 8, 16, 32, 64) if b <= max_tokens) or str(max_tokens)
