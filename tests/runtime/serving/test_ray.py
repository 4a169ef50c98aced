"""Scale-out on Ray Serve through the real CLI (`python -m tools serve --ray`) on a local Ray
instance (2 CPUs, no dashboard): the OpenAI routes through the ingress and a generator replica give
what a lone Generator gives, a full queue is 429, a client that leaves frees the replica, and SIGTERM
shuts Ray down without leaving a process behind. Needs `pip install '.[serve-ray]'`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install '.[serve-ray]')")

import openai  # noqa: E402

from tests.runtime.serving.conftest import METHOD, free_port, raw_request, wait_until  # noqa: E402

pytestmark = pytest.mark.slow   # ~40 s on 2 cores: Ray starts a cluster, a controller, a proxy, 2 replicas

MESSAGES = [{"role": "user", "content": "Tell me a story about a dragon"}]


def session_processes(sid: int) -> list[str]:
    """Command lines of the live processes of session `sid` (Ray starts its daemons in the caller's)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(proc.info["pid"]) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(proc.info["cmdline"] or [])[:120])
        except (ProcessLookupError, PermissionError):
            pass
    return found


def test_ray_serve_end_to_end(tiny_model_dir, reference):
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's unix socket paths live below it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "tools", "serve", "--ray", "--ray-num-cpus", "2", "--replicas",
                             "1", "--max-batch", "2", "--queue-size", "2", "--model", str(tiny_model_dir),
                             "--method", METHOD, "--backend", "torch", "--served-model-name", "tiny",
                             "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return raw_request(port, "GET", "/health", timeout=5).status == 200
            except OSError:
                return False

        assert wait_until(healthy, timeout=240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]

        # Greedy and seeded sampling, streamed and not: what a lone Generator gives.
        want = reference.generate(MESSAGES, max_new_tokens=12, temperature=0.9, seed=5)
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0.9, seed=5)
        assert (r.choices[0].message.content, r.usage.completion_tokens) == (want.text, len(want.token_ids))
        ids = reference.tokenizer("def fib(n):").input_ids
        want = reference.generate(ids, max_new_tokens=12)
        chunks = list(client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == 12

        # Validation on the replica: the numbers; and the ingress's own checks.
        with pytest.raises(openai.BadRequestError, match="exceeds max_context"):
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5000)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=MESSAGES)

        # One replica decoding 2 at once + a queue of 2: of 6 long requests at once, 2 are refused with 429.
        statuses = []

        def long_request():
            try:
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=600, temperature=1.0)
                statuses.append(200)
            except openai.RateLimitError as exc:
                statuses.append((429, exc.response.headers["retry-after"]))

        threads = [threading.Thread(target=long_request) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert sorted(statuses, key=str) == [(429, "1")] * 2 + [200] * 4, statuses

        # A stream whose client leaves is cancelled: the replica is free for the next request at once.
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1500, temperature=1.0,
                                                stream=True)
        next(iter(stream)), next(iter(stream))
        stream.close()
        started = time.monotonic()
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert time.monotonic() - started < 1.5   # 1500 sampled tokens take ~4 s here
        metrics = raw_request(port, "GET", "/metrics").body.decode()
        assert "ppdeploy_cancelled_generations_total 1.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert wait_until(lambda: not session_processes(proc.pid), timeout=30), session_processes(proc.pid)
    shutil.rmtree(ray_tmp, ignore_errors=True)
