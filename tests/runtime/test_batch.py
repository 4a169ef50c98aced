"""Many requests at once (runtime.BatchGenerator over packed steps, runtime/backends/packing.py): every
request gets exactly the tokens it gets alone, whatever shares its steps, joins or leaves; no sequence
sees another's cache; cancelling frees a request's cells at once. Tiny random Llama on the torch backend
(the onnxruntime engines and the real model: tests/runtime/test_ort_batch.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import BatchGenerator, Generator
from runtime.backends.base import StepTensors
from runtime.draft import Draft
from tests.runtime.test_ppd import tiny_ppd  # noqa: F401 (fixture)

PROMPTS = ["Hello there", "Write a poem about the sea and the sky", "1 2 3 4 5 6 1 2 3 4 5 6",
           "def add(a, b): return a + b", "Tell me about dragons", "Count: one two three four"]
SETTINGS = [{}, {"temperature": 0.8, "seed": 3}, {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 11}]


@pytest.fixture(scope="module")
def ppd_options(tiny_ppd):   # noqa: F811
    checkpoint, tree = tiny_ppd
    return {"checkpoint": str(checkpoint), "tree": str(tree)}


def solo(tiny_model_dir, method: str, options: dict, prompt, **decoding) -> list[int]:
    gen = Generator.from_pretrained(tiny_model_dir, method=method, **options)
    return gen.generate(prompt, max_new_tokens=24, **decoding).token_ids


@pytest.mark.parametrize("methods", [("vanilla", "ngram"), ("ppd", "hybrid", "vanilla")])
def test_every_request_gets_its_solo_tokens_whatever_shares_its_steps(tiny_model_dir, ppd_options, methods):
    """Mixed methods, options and seeds, more requests than places (they join as others leave), small
    prefill chunks (newcomers prefill beside running decodes): each request equals its solo run."""
    options = ppd_options if "ppd" in methods else {}
    solos = {m: Generator.from_pretrained(tiny_model_dir, method=m, **({} if m in ("vanilla", "ngram") else options))
             for m in methods}
    cases = [(prompt, methods[i % len(methods)], SETTINGS[i % len(SETTINGS)]) for i, prompt in enumerate(PROMPTS)]
    want = [solos[m].generate(p, max_new_tokens=24, **s).token_ids for p, m, s in cases]
    with BatchGenerator.from_pretrained(tiny_model_dir, methods=methods, max_batch=4, prefill_chunk=5,
                                        **options) as batch:
        requests = [batch.submit(p, method=m, max_new_tokens=24, **s) for p, m, s in cases]
        assert batch.active == len(cases)
        batch.run()
    assert [r.result.token_ids for r in requests] == want
    assert all(r.done and r.finish_reason in ("stop", "length") for r in requests)


def test_a_request_joining_mid_way_and_one_cancelled(tiny_model_dir):
    """Requests submitted while others decode join at the next step; a cancelled one leaves at once
    (its cells freed: the cache holds only the others'), and the rest still get their solo tokens."""
    gen = Generator.from_pretrained(tiny_model_dir, method="ngram")
    with BatchGenerator.from_pretrained(tiny_model_dir, methods=("ngram",), max_batch=3) as batch:
        first = batch.submit(PROMPTS[0], max_new_tokens=30)
        doomed = batch.submit(PROMPTS[1], max_new_tokens=30)
        for _ in range(4):
            batch.step()
        late = batch.submit(PROMPTS[2], max_new_tokens=30)
        doomed.cancel()
        batch.step()
        assert doomed.state == "cancelled" and batch.running == 2
        assert batch.backend._cache.slots == (first.slot, late.slot)
        batch.run()
    assert first.result.token_ids == gen.generate(PROMPTS[0], max_new_tokens=30).token_ids
    assert late.result.token_ids == gen.generate(PROMPTS[2], max_new_tokens=30).token_ids


def test_stop_strings_and_streams_are_per_request(tiny_model_dir):
    gen = Generator.from_pretrained(tiny_model_dir)
    full = gen.generate(PROMPTS[1], max_new_tokens=20, temperature=0.8, seed=5).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    want = gen.generate(PROMPTS[1], max_new_tokens=20, stop=[stop], temperature=0.8, seed=5)
    with BatchGenerator.from_pretrained(tiny_model_dir, max_batch=2) as batch:
        other = batch.submit(PROMPTS[0], max_new_tokens=20)
        stopped = batch.submit(PROMPTS[1], max_new_tokens=20, stop=[stop], temperature=0.8, seed=5)
        pieces = list(batch.stream(stopped))
        batch.run()
    assert "".join(pieces) == stopped.result.text == want.text and stopped.finish_reason == "stop"
    assert stopped.result.token_ids == want.token_ids
    assert other.result.token_ids == gen.generate(PROMPTS[0], max_new_tokens=20).token_ids


def test_no_sequence_sees_another_sequences_cache(tiny_model_dir):
    """Two sequences in one step: each row's logits are those of its sequence alone, while the same rows
    scored with every cached cell visible (another sequence's cache leaking in) come out different."""
    gen = Generator.from_pretrained(tiny_model_dir)
    backend = Generator.from_pretrained(tiny_model_dir).backend
    prompts = [gen.encode(PROMPTS[0]), gen.encode(PROMPTS[3])]
    alone = []
    for ids in prompts:
        backend.reset()
        backend.step(Draft.prefill(ids))
        backend.commit(range(len(ids)))
        alone.append(backend.step(Draft.chain([ids[-1]])).logits.clone())
    from runtime.backends.torch_backend import TorchBackend

    both = TorchBackend(backend.model, max_context=256, max_batch=2)
    slots = [both.open_sequence() for _ in prompts]
    both.step_batch([(slot, Draft.prefill(ids)) for slot, ids in zip(slots, prompts)])
    both.commit_batch([(slot, range(len(ids))) for slot, ids in zip(slots, prompts)])
    drafts = [(slot, Draft.chain([ids[-1]])) for slot, ids in zip(slots, prompts)]
    outputs = both.step_batch(drafts)
    for output, want in zip(outputs, alone):
        torch.testing.assert_close(output.logits, want, rtol=1e-5, atol=1e-5)
        assert output.logits.argmax().item() == want.argmax().item()
    # The same rows with the past mask dropped: each sees both sequences' cells, and its logits move.
    ids = torch.tensor([ids[-1] for ids in prompts])
    positions = torch.tensor([len(ids) for ids in prompts])
    tree_mask = torch.tensor([[0.0, torch.finfo().min], [torch.finfo().min, 0.0]])
    leaked, _, _ = both._run(StepTensors(ids, positions, tree_mask, None, both._cache.used))
    assert not torch.allclose(leaked[0], alone[0][0], atol=1e-3)


def test_requests_are_refused_before_they_are_queued(tiny_model_dir):
    with BatchGenerator.from_pretrained(tiny_model_dir, methods=("vanilla",), max_batch=2) as batch:
        with pytest.raises(ValueError, match="not loaded in this BatchGenerator"):
            batch.submit("hi", method="ngram")
        with pytest.raises(ValueError, match="exceeds max_context"):
            batch.submit("hi", max_new_tokens=10**6)
        with pytest.raises(ValueError, match="chat message 0 has no 'role'"):
            batch.submit([{"content": "hi"}])
        with pytest.raises(ValueError, match="temperature"):
            batch.submit("hi", temperature=-1)
        assert batch.active == 0
    with pytest.raises(ValueError, match="max_batch must be 1..1"):
        BatchGenerator(Generator.from_pretrained(tiny_model_dir).backend, None, {"x": None}, [0], max_batch=2)
    with pytest.raises(ValueError, match="one backend runs one graph"):
        BatchGenerator.from_pretrained(tiny_model_dir, methods=("ppd", "ht"))


def test_packed_rows_continue_a_short_step_as_a_chain():
    """Padding (engines with a minimum step size) and static shapes (GPU engines): the padding rows are a
    chain after the last real row, never seen by a real row; cells beyond the used ones are hidden."""
    from runtime.backends.packing import plan_step
    from runtime.kv_cache import KVCache

    cache = KVCache(1, 16, 1, 2, capacity=32)
    a, b = cache.open(), cache.open()
    cache.commit(a, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), range(3))
    cache.commit(b, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), range(2))
    low = float(np.finfo(np.float32).min)
    plan = plan_step([(a, Draft.chain([7])), (b, Draft.from_parents([8, 9, 10], [-1, 0, 0]))], cache, low,
                     static=(6, 8))
    assert plan.tokens.tolist() == [7, 8, 9, 10, 10, 10] and plan.positions.tolist() == [3, 2, 3, 3, 4, 5]
    visible = plan.tree_mask == 0
    assert visible[:4, :4].tolist() == [[True, False, False, False], [False, True, False, False],
                                        [False, True, True, False], [False, True, False, True]]
    assert not visible[:4, 4:].any() and visible[5].tolist() == [False, True, False, True, True, True]
    past = plan.past_mask == 0
    assert past.shape == (6, 8) and past[0].tolist() == [True] * 3 + [False] * 5
    assert past[1].tolist() == [False] * 3 + [True] * 2 + [False] * 3 and (past[4] == past[3]).all()
