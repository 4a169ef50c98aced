"""Many requests at once on the real model: 16 real prompts (8 MT-Bench, 8 HumanEval: mixed lengths) with
mixed methods (vanilla, ngram, ppd, hybrid: all on the ppd graph, with the committed prompt tokens and
trees) and mixed decoding options (greedy, and sampling with a seed of its own per request) decoded by
one BatchGenerator with 6 places, so requests join as others leave and newcomers prefill in chunks beside
running trees; each request's tokens equal its solo run with the single-sequence Generator. onnxruntime
in the default tier, torch in the slow one.

The committed trees' batch record gives most batch sizes no tree on a CPU (a step of 3 or more decodes
faster plain), which would leave the trees of many sequences in one step untested: the default-tier test
decodes the one-sequence trees at every batch size (the committed files without their batch record,
where the runtime looks first), the slow one the trees as committed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.methods import CHECKPOINTS_DIR
from export.tree_store import generated_dir
from runtime import BatchGenerator, Generator
from tests.conftest import first_difference
from tools.bench.prompts import load_prompts
from trees.ppd_tree import BATCH_FIELD

METHODS = ("vanilla", "ngram", "ppd", "hybrid")
SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def cases(count: int) -> list[tuple[str, str, str, dict]]:
    """(id, prompt, method, decoding options) of `count` requests, alternating sets, methods and options."""
    prompts = [p for pair in zip(load_prompts("mtbench", limit=count // 2), load_prompts("humaneval", limit=count // 2))
               for p in pair]
    return [(item.id, item.prompt, METHODS[i % len(METHODS)], {} if i % 3 else {**SAMPLING, "seed": 1000 + i})
            for i, item in enumerate(prompts)]


def batch_against_solo(model_dir, backend: str, count: int, new_tokens: int,
                       tree_steps: list[int] | None = None) -> list[str]:
    """Mismatches of each request of the batch against its solo run (empty: every request equal).
    `tree_steps` (if given) gets, per batched step of 3 or more sequences, how many decoded a PPD tree."""
    requests = cases(count)
    solo = {m: Generator.from_pretrained(model_dir, method=m, backend=backend) for m in METHODS}
    want = {rid: solo[m].generate(p, max_new_tokens=new_tokens, **o).token_ids for rid, p, m, o in requests}
    with BatchGenerator.from_pretrained(model_dir, methods=METHODS, backend=backend, max_batch=6,
                                        prefill_chunk=96) as batch:
        step_batch = batch.backend.step_batch

        def counting(work):
            if tree_steps is not None and len(work) >= 3:   # decode drafts with prompt tokens (ppd, hybrid)
                tree_steps.append(sum(d.layout.first_verified == 0 and len(d.layout.predict_rows) > 0 for _, d in work))
            return step_batch(work)
        batch.backend.step_batch = counting
        submitted = {rid: batch.submit(p, method=m, max_new_tokens=new_tokens, **o) for rid, p, m, o in requests}
        batch.run()
    bad = []
    for rid, request in submitted.items():
        first = first_difference(request.result.token_ids, want[rid])
        if first is not None:
            bad.append(f"{rid} ({request.method}, {'sampled' if request.options.temperature else 'greedy'}): "
                       f"first difference at new token {first}")
    return bad


def trees_at_every_batch_size(backend: str) -> list[Path]:
    """Copy the committed ppd and hybrid trees of `backend` without their batch record where the runtime
    looks first (the test's generated dir): every step then decodes the one-sequence trees, whatever B."""
    copies = []
    for method in ("ppd", "hybrid"):
        committed = CHECKPOINTS_DIR / f"{method}-tree-cpu-{backend}.json"
        data = json.loads(committed.read_text())
        assert data.pop(BATCH_FIELD, None), f"{committed} has no batch record: this test would test nothing new"
        copy = generated_dir(CHECKPOINTS_DIR) / committed.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(json.dumps(data))
        copies.append(copy)
    return copies


def test_16_real_requests_together_get_their_solo_tokens_on_onnxruntime(real_model_dir, trained_ppd_checkpoint):
    trees_at_every_batch_size("onnxruntime")
    tree_steps: list[int] = []
    bad = batch_against_solo(real_model_dir, "onnxruntime", 16, 32, tree_steps)
    assert not bad, f"requests that a batch changed: {bad}"
    assert sum(n >= 2 for n in tree_steps) >= 10, f"too few steps with PPD trees of several sequences: {tree_steps}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_16_real_requests_together_get_their_solo_tokens_long(real_model_dir, trained_ppd_checkpoint, backend):
    bad = batch_against_solo(real_model_dir, backend, 16, 96)
    assert not bad, f"requests that a batch changed on {backend}: {bad}"
