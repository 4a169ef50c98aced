"""python -m tools serve: flags from ServeCommand, defaults in one place, clear errors, a real run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tools.commands import main
from tools.serving.cli import API_KEY_ENV, SERVE_BACKEND, SERVE_METHOD, ServeCommand, build_parser
from tests.runtime.serving.conftest import free_port, raw_request
from trees.config_args import config_from_args


def parsed(*argv: str) -> ServeCommand:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_bind_loopback_and_serve_the_fastest_lossless_configuration():
    cfg = parsed()
    assert (cfg.host, cfg.port, cfg.ray, cfg.replicas) == ("127.0.0.1", 8000, False, 1)
    spec = cfg.spec()
    assert (spec.method, spec.backend, spec.engine) == (SERVE_METHOD, SERVE_BACKEND, None) == ("hybrid", "onnxruntime",
                                                                                              None)
    assert parsed("--engine", "/x").spec().method is None   # an engine runs its own method unless told
    assert parsed("--method", "ppd", "--option", "tree=t.json").spec().options == {"tree": "t.json"}


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parsed().key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parsed().key() == "from-env" and parsed("--api-key", "flag").key() == "flag"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--replicas", "0"], "--replicas"),
    (["--min-replicas", "1", "--max-replicas", "2"], "autoscaling needs --ray"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "autoscaling needs"),
])
def test_bad_settings_exit_2_before_serving(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_runs_until_sigterm(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "PPDEPLOY_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tools", "serve", "--model", str(tiny_model_dir), "--method",
                             "vanilla", "--backend", "torch", "--port", str(port), "--served-model-name", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if raw_request(port, "GET", "/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert raw_request(port, "POST", "/v1/chat/completions", body).status == 401
        reply = raw_request(port, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer k"})
        assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode in (0, -signal.SIGTERM), out   # uvicorn re-raises the signal once it has shut down
    assert "Application shutdown complete" in out
    assert "serving" in out and "as model 'tiny'" in out


def test_loadgen_reports_the_figures(served, capsys):
    from tools.serving.loadgen import main as loadgen

    assert loadgen(["--url", served.url, "--requests", "6", "--concurrency", "3", "--max-tokens", "4"]) == 0
    line = capsys.readouterr().out
    assert "6 requests: 6 answered, 0 refused (429), 0 failed, 0 retries" in line and "time to first token p50" in line


def test_loadgen_retries_after_429_as_the_server_asks(served, monkeypatch):
    """A client refused with 429 waits the Retry-After it was sent, then sends the request again."""
    from tools.serving import loadgen
    from tools.serving.loadgen import LoadConfig, Outcome, one_request

    answers = iter([(Outcome(429, 0.01, None, 0), 0.05), (Outcome(429, 0.02, None, 0), 0.05),
                    (Outcome(200, 0.5, 0.1, 4), 0.0)])
    slept = []
    monkeypatch.setattr(loadgen, "attempt", lambda cfg, model, key, start: next(answers))
    monkeypatch.setattr(loadgen.time, "sleep", slept.append)
    outcome = one_request(LoadConfig(retry=True), "tiny", None)
    assert outcome.status == 200 and outcome.refusals == 2 and slept == [0.05, 0.05]
    refused = iter([(Outcome(429, 0.01, None, 0), 1.0)] * 3)
    monkeypatch.setattr(loadgen, "attempt", lambda cfg, model, key, start: next(refused))
    assert one_request(LoadConfig(retry=False), "tiny", None).status == 429
