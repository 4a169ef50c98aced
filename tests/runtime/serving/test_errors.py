"""Bad requests are refused before anything is queued, with the right status and OpenAI's error shape
naming the field; API keys; /health while loading."""

from __future__ import annotations

import json
import threading

import openai
import pytest

from tests.runtime.serving.conftest import MODEL_ID, serve

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def chat_body(**fields) -> dict:
    return {"model": MODEL_ID, "messages": OK_MESSAGES, "max_tokens": 4, **fields}


def assert_error(reply, status: int, *words: str, param: str | None = None) -> dict:
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("fields, param, words", [
    ({"messages": []}, "messages", ["at least 1"]),
    ({"messages": [{"role": "user"}]}, "messages[0].content", ["required"]),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", ["content must be a string"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", ["'user'"]),
    ({"messages": "hi"}, "messages", ["array"]),
    ({"max_tokens": 0}, "max_tokens", ["greater than or equal to 1"]),
    ({"max_tokens": -3}, "max_tokens", ["greater than or equal to 1"]),
    ({"max_tokens": "5"}, "max_tokens", ["integer"]),
    ({"max_tokens": 5.0}, "max_tokens", ["integer"]),
    ({"temperature": "hot"}, "temperature", ["number"]),
    ({"temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ({"top_p": 0}, "top_p", ["greater than 0"]),
    ({"stream": "yes"}, "stream", ["boolean"]),
    ({"seed": 1.5}, "seed", ["integer"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"n": 2}, "n", ["1"]),
    ({"logprobs": True}, "logprobs", ["unsupported"]),
    ({"stream_options": {"include_usage": True}}, "stream_options", ["only allowed when stream"]),
    ({"messages": [{"role": "user", "content": "x"}] * 257}, "messages", ["at most 256"]),
])
def test_bad_fields_are_400_naming_the_field(served, fields, param, words):
    assert_error(served.request("POST", CHAT, chat_body(**fields)), 400, *words, param=param)


def test_missing_model_and_messages(served):
    assert_error(served.request("POST", CHAT, {"messages": OK_MESSAGES}), 400, "required", param="model")
    assert_error(served.request("POST", CHAT, {"model": MODEL_ID}), 400, "required", param="messages")
    assert_error(served.request("POST", "/v1/completions", {"model": MODEL_ID, "prompt": ""}), 400,
                 "non-empty", param="prompt")


def test_malformed_json_and_non_objects(served):
    assert_error(served.request("POST", CHAT, b'{"model": "tiny", "messages": ['), 400, "malformed JSON")
    assert_error(served.request("POST", CHAT, b"[1, 2]"), 400, "JSON object")
    assert_error(served.request("POST", CHAT, b""), 400, "malformed JSON")


def test_budget_beyond_the_context_says_the_numbers(served, reference):
    reply = served.request("POST", CHAT, chat_body(max_tokens=5000))
    error = assert_error(reply, 400, "max_tokens (5000)", "exceeds max_context 2048", param="max_tokens")
    assert error["code"] == "context_length_exceeded"
    prompt_len = len(reference.encode(OK_MESSAGES))
    assert f"prompt ({prompt_len} tokens)" in error["message"]
    long_prompt = {"model": MODEL_ID, "prompt": list(range(100, 2100)), "max_tokens": 100}
    assert_error(served.request("POST", "/v1/completions", long_prompt), 400, "exceeds max_context")


def test_token_ids_out_of_range(served):
    body = {"model": MODEL_ID, "prompt": [1, 10**9], "max_tokens": 2}
    assert_error(served.request("POST", "/v1/completions", body), 400, "out of range", param="prompt")


def test_unknown_model_is_404(served):
    error = assert_error(served.request("POST", CHAT, chat_body(model="gpt-9")), 404, "gpt-9", MODEL_ID,
                         param="model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-9", messages=OK_MESSAGES)
    assert served.request("GET", "/v1/models/gpt-9").status == 404


def test_unknown_route_and_method_in_openai_shape(served):
    assert_error(served.request("GET", "/v1/nothing"), 404)
    assert_error(served.request("GET", CHAT), 405)


def test_large_bodies_are_413(served):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (1 << 20)}]))
    assert_error(served.request("POST", CHAT, big), 413, "exceeds")
    # Chunked, without a Content-Length: refused while reading.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
    conn.request("POST", CHAT, body=iter([big[i:i + 65536].encode() for i in range(0, len(big), 65536)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


@pytest.fixture(scope="module")
def keyed(make_generator):
    yield from serve(make_generator, api_key="s3cret")


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT),
                                          ("POST", "/v1/completions"), ("GET", "/v1/nothing")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "s3cret", "Bearer s3cret2", "Basic s3cret"])
def test_api_key_is_required_on_every_route_but_health(keyed, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    error = assert_error(keyed.request(method, path, chat_body(), headers), 401, "API key")
    assert error["code"] == "invalid_api_key"


def test_the_right_key_works(keyed):
    assert keyed.request("GET", "/health").status == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    client = keyed.client(api_key="s3cret")
    assert client.models.list().data[0].id == MODEL_ID
    r = client.chat.completions.create(model=MODEL_ID, messages=OK_MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_health_is_503_while_loading(make_generator):
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return make_generator()

    from runtime.serving.app import create_app
    from runtime.serving.worker import LocalEngine
    from tests.runtime.serving.conftest import ServerThread, raw_request

    engine = LocalEngine(slow_load)
    with ServerThread(create_app(engine, MODEL_ID)) as server:
        assert_error(raw_request(server.port, "GET", "/health"), 503, "loading")
        assert_error(raw_request(server.port, "POST", CHAT, chat_body()), 503, "loading")
        assert raw_request(server.port, "GET", "/v1/models").status == 200
        release.set()
        engine.wait_ready(60)
        assert raw_request(server.port, "GET", "/health").status == 200
        assert raw_request(server.port, "POST", CHAT, chat_body()).status == 200
    engine.close()


def test_a_failed_load_is_503_with_the_reason():
    def broken():
        raise FileNotFoundError("no weights here")

    from runtime.serving.app import create_app
    from runtime.serving.worker import LocalEngine
    from tests.runtime.serving.conftest import ServerThread, raw_request

    engine = LocalEngine(broken)
    with pytest.raises(RuntimeError, match="no weights here"):
        engine.wait_ready(10)
    with ServerThread(create_app(engine, MODEL_ID)) as server:
        assert_error(raw_request(server.port, "GET", "/health"), 503, "loading the model failed", "no weights here")
