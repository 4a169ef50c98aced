"""The transformers peers of the bench, on their own model in the bench's dtype: `hf-generate` (plain
greedy or sampled `generate`), `hf-prompt-lookup` (its prompt-lookup decoding) and `hf-compiled`
(`generate` over a static cache with its decoding step under torch.compile, mode "reduce-overhead":
CUDA graphs; what a user would pick instead of us on a GPU). The compiled peer's cache is sized once
(HF_COMPILED_CACHE tokens) so every prompt decodes at one shape, and it is warmed up before the bench
times it (the first calls compile)."""

from __future__ import annotations

import time

import torch

from runtime.decoding import DecodingOptions
from tools.bench.runs import PromptRun, Runner

HF_PROMPT_LOOKUP_TOKENS = 10
HF_COMPILED_CACHE = 2048      # the compiled peer's static cache (tokens): one shape for every prompt
HF_PEER_MODES = ("generate", "prompt-lookup", "compiled")


def bench_runner(model_dir: str, device: str, max_new_tokens: int, eos_token_id: int, mode: str = "generate",
                 decoding: DecodingOptions = DecodingOptions(), dtype: str = "fp32") -> Runner:
    """transformers `generate` in `mode` (HF_PEER_MODES); under sampling with its own sampler (seeded per
    prompt with decoding.seed, so its tokens are not ours: only its speed compares)."""
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    from runtime.backends import torch_dtype

    if mode not in HF_PEER_MODES:
        raise ValueError(f"unknown transformers peer mode {mode!r}; choose one of {', '.join(HF_PEER_MODES)}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(device).eval()
    prompt_lookup = mode == "prompt-lookup"
    extra: dict = {"prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS} if prompt_lookup else {}
    if mode == "compiled":
        # Every device compiles (transformers compiles only on GPUs by default); fullgraph: a graph break
        # would leave the host in the loop, which this peer exists to show without.
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead", dynamic=False)
        model.generation_config.compile_config._compile_all_devices = True
        extra.update(cache_implementation="static", max_cache_len=HF_COMPILED_CACHE)
    if not decoding.greedy:
        extra.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)

    @torch.inference_mode()
    def run(prompt_ids: list[int]) -> PromptRun:
        ids = torch.tensor([prompt_ids], device=model.device)
        if not decoding.greedy:
            torch.manual_seed(decoding.seed)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not decoding.greedy, pad_token_id=eos_token_id, eos_token_id=eos_token_id,
                             **extra)
        seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids):].tolist()
        # Without prompt lookup, HF decodes one token per forward after prefill.
        return PromptRun(new, None if prompt_lookup else len(new), seconds)

    if mode == "compiled":   # compile (and capture) before anything is timed
        for _ in range(2):
            run([eos_token_id, eos_token_id, eos_token_id])
    return run
