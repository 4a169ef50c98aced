"""The transformers peers of the bench: `hf-generate` (plain greedy or sampled `generate`) and
`hf-prompt-lookup` (its prompt-lookup decoding), on their own fp32 model."""

from __future__ import annotations

import time

import torch

from runtime.decoding import DecodingOptions
from tools.bench.runs import PromptRun, Runner

HF_PROMPT_LOOKUP_TOKENS = 10


def bench_runner(model_dir: str, device: str, max_new_tokens: int, eos_token_id: int, prompt_lookup: bool,
                 decoding: DecodingOptions = DecodingOptions()) -> Runner:
    """transformers `generate`; under sampling with its own sampler (seeded per prompt with decoding.seed,
    so its tokens are not ours: only its speed compares)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    extra = {"prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS} if prompt_lookup else {}
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
    return run
