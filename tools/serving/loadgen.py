"""python -m tools.serving.loadgen: a bounded load test of a running server (ours or any
OpenAI-compatible one): N streamed chat requests from C concurrent clients.

With --retry, a client refused with 429 waits what the server's Retry-After asks and sends the same
request again, until it is answered or --max-wait seconds have passed since its first attempt (its
latency and time to first token count from that first attempt). Without it, a 429 is final.

Prints requests/s, tokens/s, the p50 / p95 latency and time to first token of the answered requests,
how many 429s were seen and how many requests stayed refused. Plain http.client (streaming, so the
first token's arrival is seen), so it needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from trees.config_args import add_config_arguments, config_from_args, option


@dataclass(frozen=True)
class LoadConfig:
    url: str = option("http://127.0.0.1:8000", "the server")
    model: str | None = option(None, "the `model` to ask for (default: the server's first)")
    requests: int = option(200, "requests in all")
    concurrency: int = option(16, "clients sending at once")
    max_tokens: int = option(32, "max_tokens of each request")
    prompt: str = option("Write a haiku about GPUs", "the user message")
    api_key: str | None = option(None, "bearer key (default: $PPDEPLOY_API_KEY, if set)")
    retry: bool = option(False, "on 429, wait the Retry-After the server sends and send the request again")
    max_wait: float = option(120.0, "--retry: seconds a request may keep retrying after its first attempt")


@dataclass(frozen=True)
class Outcome:
    status: int                     # of the last attempt
    seconds: float                  # first attempt sent to the stream's end
    first_token: float | None       # first attempt sent to the first text
    tokens: int
    refusals: int = 0               # 429s before the last attempt


@dataclass(frozen=True)
class Summary:
    requests: int
    answered: int
    refused: int                    # still 429 at the end
    failed: int                     # any other status
    seconds: float
    p50: float
    p95: float
    ttft_p50: float
    ttft_p95: float
    tokens: int
    retried: int = 0                # 429s that were retried

    def line(self) -> str:
        return (f"{self.requests} requests: {self.answered} answered, {self.refused} refused (429), {self.failed} "
                f"failed, {self.retried} retries after 429 in {self.seconds:.1f}s = {self.answered / self.seconds:.2f} requests/s, "
                f"{self.tokens / self.seconds:.1f} tokens/s; latency p50 {self.p50:.3f}s p95 {self.p95:.3f}s; "
                f"time to first token p50 {self.ttft_p50:.3f}s p95 {self.ttft_p95:.3f}s")


def _headers(key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=600)


def one_request(cfg: LoadConfig, model: str, key: str | None) -> Outcome:
    """One request, retried after each 429 (when cfg.retry) as the server's Retry-After asks."""
    start, refusals = time.perf_counter(), 0
    while True:
        outcome, retry_after = attempt(cfg, model, key, start)
        if outcome.status != 429 or not cfg.retry or time.perf_counter() - start + retry_after > cfg.max_wait:
            return Outcome(outcome.status, outcome.seconds, outcome.first_token, outcome.tokens, refusals)
        refusals += 1
        time.sleep(retry_after)


def attempt(cfg: LoadConfig, model: str, key: str | None, start: float) -> tuple[Outcome, float]:
    """One attempt (times counted from `start`) and the Retry-After it was given (0 if none)."""
    body = {"model": model, "messages": [{"role": "user", "content": cfg.prompt}], "max_tokens": cfg.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = _connection(cfg.url)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), _headers(key))
    response = conn.getresponse()
    first, tokens = None, 0
    if response.status == 200:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    else:
        response.read()
    retry_after = float(response.getheader("Retry-After") or 0)
    conn.close()
    return Outcome(response.status, time.perf_counter() - start, first, tokens), retry_after


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_load(cfg: LoadConfig) -> Summary:
    key = cfg.api_key or os.environ.get("PPDEPLOY_API_KEY")
    model = cfg.model
    if model is None:
        conn = _connection(cfg.url)
        conn.request("GET", "/v1/models", headers=_headers(key))
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
    start = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        outcomes = list(pool.map(lambda _: one_request(cfg, model, key), range(cfg.requests)))
    seconds = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == 200]
    refused = sum(o.status == 429 for o in outcomes)
    ttft = [o.first_token for o in ok if o.first_token is not None]
    return Summary(cfg.requests, len(ok), refused, len(outcomes) - len(ok) - refused, seconds,
                   _quantile([o.seconds for o in ok], 0.5), _quantile([o.seconds for o in ok], 0.95),
                   _quantile(ttft, 0.5), _quantile(ttft, 0.95), sum(o.tokens for o in ok),
                   sum(o.refusals for o in outcomes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.serving.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, LoadConfig)
    parser.set_defaults(config_class=LoadConfig)
    print(run_load(config_from_args(parser.parse_args(argv))).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
