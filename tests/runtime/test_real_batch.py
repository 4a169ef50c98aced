"""Many requests at once on the real model: 16 real prompts (8 MT-Bench, 8 HumanEval: mixed lengths) with
mixed methods (vanilla, ngram, ppd, hybrid: all on the ppd graph, with the committed prompt tokens and
trees) and mixed decoding options (greedy, and sampling with a seed of its own per request) decoded by
one BatchGenerator with 6 places, so requests join as others leave and newcomers prefill in chunks beside
running trees; each request's tokens equal its solo run with the single-sequence Generator. onnxruntime
in the default tier, torch in the slow one."""

from __future__ import annotations

import pytest

from runtime import BatchGenerator, Generator
from tests.conftest import first_difference
from tools.bench.prompts import load_prompts

METHODS = ("vanilla", "ngram", "ppd", "hybrid")
SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def cases(count: int) -> list[tuple[str, str, str, dict]]:
    """(id, prompt, method, decoding options) of `count` requests, alternating sets, methods and options."""
    prompts = [p for pair in zip(load_prompts("mtbench", limit=count // 2), load_prompts("humaneval", limit=count // 2))
               for p in pair]
    return [(item.id, item.prompt, METHODS[i % len(METHODS)], {} if i % 3 else {**SAMPLING, "seed": 1000 + i})
            for i, item in enumerate(prompts)]


def batch_against_solo(model_dir, backend: str, count: int, new_tokens: int) -> list[str]:
    """Mismatches of each request of the batch against its solo run (empty: every request equal)."""
    requests = cases(count)
    solo = {m: Generator.from_pretrained(model_dir, method=m, backend=backend) for m in METHODS}
    want = {rid: solo[m].generate(p, max_new_tokens=new_tokens, **o).token_ids for rid, p, m, o in requests}
    with BatchGenerator.from_pretrained(model_dir, methods=METHODS, backend=backend, max_batch=6,
                                        prefill_chunk=96) as batch:
        submitted = {rid: batch.submit(p, method=m, max_new_tokens=new_tokens, **o) for rid, p, m, o in requests}
        batch.run()
    bad = []
    for rid, request in submitted.items():
        first = first_difference(request.result.token_ids, want[rid])
        if first is not None:
            bad.append(f"{rid} ({request.method}, {'sampled' if request.options.temperature else 'greedy'}): "
                       f"first difference at new token {first}")
    return bad


def test_16_real_requests_together_get_their_solo_tokens_on_onnxruntime(real_model_dir, trained_ppd_checkpoint):
    bad = batch_against_solo(real_model_dir, "onnxruntime", 16, 32)
    assert not bad, f"requests that a batch changed: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_16_real_requests_together_get_their_solo_tokens_long(real_model_dir, trained_ppd_checkpoint, backend):
    bad = batch_against_solo(real_model_dir, backend, 16, 96)
    assert not bad, f"requests that a batch changed on {backend}: {bad}"
