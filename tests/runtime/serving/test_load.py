"""A bounded load test on loopback: 200 requests from 16 concurrent clients against 2 workers and a
queue of 8. Every attempt is answered (with exactly what a lone Generator gives) or refused with 429
(the client then retries, as Retry-After asks); none is lost, none is left running."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.runtime.serving.conftest import MODEL_ID, metric, serve

REQUESTS, CLIENTS, SEEDS, MAX_TOKENS, RETRY_SECONDS = 200, 16, 20, 8, 30.0


@pytest.fixture(scope="module")
def two_workers(make_generator):
    yield from serve(make_generator, replicas=2, queue_size=8)


def test_load_every_request_answered_exactly_or_refused(two_workers, reference):
    prompt = [{"role": "user", "content": "Tell me a story about a dragon"}]
    want = {s: reference.generate(prompt, max_new_tokens=MAX_TOKENS, temperature=0.9, seed=s) for s in range(SEEDS)}
    client = two_workers.client(timeout=60)

    def ask(i: int):
        """(seed, text, completion tokens, 429s seen); text None if refused every time."""
        seed, refusals = i % SEEDS, 0
        deadline = time.monotonic() + RETRY_SECONDS   # bounded by time, not tries: a busy CI machine is slower
        while time.monotonic() < deadline:
            try:
                return (seed, *attempt(seed, i % 3 == 0), refusals)
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                refusals += 1
                time.sleep(0.02)   # a test does not wait the second Retry-After asks for
        return seed, None, None, refusals

    def attempt(seed: int, stream: bool) -> tuple[str, int]:
        r = client.chat.completions.create(model=MODEL_ID, messages=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0.9, seed=seed, stream=stream,
                                           **({"stream_options": {"include_usage": True}} if stream else {}))
        if not stream:
            return r.choices[0].message.content, r.usage.completion_tokens
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(ask, range(REQUESTS)))
    elapsed = time.monotonic() - start
    answered = [(seed, text, n) for seed, text, n, _ in results if text is not None]
    refused = sum(r[3] for r in results)
    assert len(answered) == REQUESTS, "a request was refused every time"
    for seed, text, n in answered:   # nothing lost, duplicated or mixed up between requests
        assert (text, n) == (want[seed].text, len(want[seed].token_ids)), seed
    assert elapsed < 120
    status = two_workers.engine.status()
    assert (status.busy, status.queued) == (0, 0)
    ok = metric(two_workers, 'ppdeploy_requests_total{route="/v1/chat/completions",status="200"}')
    assert ok == len(answered)
    if refused:
        assert metric(two_workers, 'ppdeploy_requests_total{route="/v1/chat/completions",status="429"}') == refused
    print(f"\n{REQUESTS} requests, {CLIENTS} clients: {refused} refusals (429) on the way, "
          f"{elapsed:.1f}s, {REQUESTS / elapsed:.0f} requests/s")
