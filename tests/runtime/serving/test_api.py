"""The OpenAI routes through the official openai client: the same text and token counts as a lone
Generator (greedy and seeded sampling), usage, finish reasons, stop strings, streams, 8 clients at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.runtime.serving.conftest import MODEL_ID

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about GPUs"}]
RAW_PROMPTS = ["Write a haiku about GPUs", "What is 2+2?", "def fib(n):", "Tell me a story about a dragon"]


def chat(client, stream: bool, messages=MESSAGES, **kwargs) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of a chat completion, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].choices == []
    return text, finish[0], chunks[-1].usage


def complete(client, stream: bool, prompt, **kwargs) -> tuple[str, str, object]:
    if not stream:
        r = client.completions.create(model=MODEL_ID, prompt=prompt, **kwargs)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[0], chunks[-1].usage


def raw_ids(reference, prompt: str) -> list[int]:
    return reference.tokenizer(prompt).input_ids


@pytest.mark.parametrize("stream", [False, True])
def test_chat_is_what_the_generator_gives(served, reference, stream):
    want = reference.generate(MESSAGES, max_new_tokens=12)
    text, finish, usage = chat(served.client(), stream, max_tokens=12, temperature=0)
    assert text == want.text and finish == "length"
    assert usage.completion_tokens == len(want.token_ids) == 12
    assert usage.prompt_tokens == len(reference.encode(MESSAGES))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_continues_the_raw_text(served, reference, stream, as_ids):
    prompt = RAW_PROMPTS[2]
    ids = raw_ids(reference, prompt)
    want = reference.generate(ids, max_new_tokens=16)
    text, finish, usage = complete(served.client(), stream, ids if as_ids else prompt, max_tokens=16, temperature=0)
    assert text == want.text and (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(want.token_ids))
    assert finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_sampling_is_what_the_generator_gives(served, reference, stream):
    want = reference.generate(MESSAGES, max_new_tokens=20, temperature=0.8, top_p=0.95, seed=1234)
    text, _, usage = chat(served.client(), stream, max_tokens=20, temperature=0.8, top_p=0.95, seed=1234)
    assert text == want.text and usage.completion_tokens == len(want.token_ids)
    assert len(set(text.split())) > 3   # really sampled (greedy on the tiny model repeats one token)


def test_unseeded_sampling_reports_its_seed(served, reference):
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    reply = served.request("POST", "/v1/chat/completions", body).json()
    assert isinstance(reply["seed"], int)
    want = reference.generate(MESSAGES, max_new_tokens=8, temperature=1.0, seed=reply["seed"])
    assert reply["choices"][0]["message"]["content"] == want.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_and_is_left_out(served, reference, stream):
    full = reference.generate(MESSAGES, max_new_tokens=20, temperature=0.8, seed=7).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full.index(stop)
    text, finish, _ = chat(served.client(), stream, max_tokens=20, temperature=0.8, seed=7, stop=[stop, "never"])
    assert (text, finish) == (full[:cut], "stop")


def test_default_budget_is_what_the_context_leaves(served, reference):
    ids = raw_ids(reference, RAW_PROMPTS[0])
    reply = served.request("POST", "/v1/completions", {"model": MODEL_ID, "prompt": ids, "temperature": 0}).json()
    draft = reference.proposer.max_draft_tokens
    want = reference.backend.info.max_context - len(ids) - draft   # the tiny model never says EOS here
    assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (want, "length")


def test_eight_concurrent_clients_each_get_what_a_lone_generator_gives(served, reference):
    cases = [(MESSAGES[1:], 0.7 + 0.05 * i, i) for i in range(6)] + [(MESSAGES, 0.0, None), (MESSAGES[1:], 0.0, None)]
    want = [reference.generate(m, max_new_tokens=16, temperature=t, seed=s) for m, t, s in cases]
    client = served.client()

    def ask(case):
        messages, temperature, seed = case
        return chat(client, seed is not None and seed % 2 == 0, messages, max_tokens=16, temperature=temperature,
                    seed=seed)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, cases))
    assert [(text, usage.completion_tokens) for text, _, usage in got] == [(w.text, len(w.token_ids)) for w in want]


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert served.request("GET", "/health").status == 200
    assert served.request("GET", f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
