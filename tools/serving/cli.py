"""python -m tools serve: the OpenAI-compatible server over runtime.Generator.

Binds 127.0.0.1 (this machine only) unless --host says otherwise. With --api-key KEY (or the
PPDEPLOY_API_KEY environment variable, which keeps the key out of `ps`), every route but /health
needs `Authorization: Bearer KEY`. --ray scales out on Ray Serve (pip install '.[serve-ray]').
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import dataclass

from export.checkpoint import CheckpointError
from export.manifest import DEFAULT_MAX_CONTEXT
from export.methods import METHODS
from runtime.loading import BACKENDS
from runtime.batch import DEFAULT_MAX_BATCH
from runtime.generator import DEFAULT_DEVICE
from tools.recommended import FASTEST_BACKEND, FASTEST_METHOD
from runtime.serving.schemas import MAX_BODY_BYTES
from runtime.serving.spec import GeneratorSpec
from runtime.serving.worker import DEFAULT_QUEUE_SIZE
from trees.config_args import add_config_arguments, config_from_args, exit_code_of, option, parse_options

# The server's default is the fastest lossless configuration measured here (tools/recommended.py).
SERVE_METHOD = FASTEST_METHOD
SERVE_BACKEND = FASTEST_BACKEND
API_KEY_ENV = "PPDEPLOY_API_KEY"


@dataclass(frozen=True)
class ServeFlags:
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "TCP port")
    model: str | None = option(None, "checkpoint dir of a supported family (default: the SmolLM2 model of `make model`)")
    checkpoint: str | None = option(None, "a trained method's checkpoint (prompt tokens / HT maps) for --model "
                                          "(default: the committed SmolLM2 one)")
    engine: str | None = option(None, "serve this exported engine dir instead (Generator.from_engine)")
    method: str | None = option(None, f"decoding method (default: {SERVE_METHOD}, the fastest lossless one "
                                      "here; with --engine, the engine's own)", choices=tuple(METHODS))
    backend: str = option(SERVE_BACKEND, "backend that runs the model (ignored with --engine)",
                          choices=tuple(BACKENDS))
    device: str = option(DEFAULT_DEVICE, "cpu or cuda")
    max_context: int = option(DEFAULT_MAX_CONTEXT, "cache entries: prompt + max_tokens must fit")
    served_model_name: str | None = option(None, "the `model` clients ask for (default: the model's name)")
    api_key: str | None = option(None, f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, if set)")
    replicas: int = option(1, "generators, each on its own worker thread (Ray replicas with --ray)")
    max_batch: int = option(DEFAULT_MAX_BATCH, "requests each generator decodes together in every step "
                                               "(continuous batching, runtime.BatchGenerator)")
    queue_size: int = option(DEFAULT_QUEUE_SIZE, "requests that may wait for a place in a batch; beyond them: 429")
    threads: int | None = option(None, "compute threads of each generator (default: every core for one replica; "
                                       "with --ray, each replica's --replica-cpus)")
    max_body_bytes: int = option(MAX_BODY_BYTES, "largest request body accepted (else 413)")
    ray: bool = option(False, "scale out on Ray Serve: an ingress deployment + generator replicas")
    min_replicas: int | None = option(None, "--ray: autoscale between --min-replicas and --max-replicas")
    max_replicas: int | None = option(None, "--ray: autoscaling upper bound")
    ray_num_cpus: int | None = option(None, "--ray: CPUs of the local Ray instance (default: all)")
    replica_cpus: float = option(1.0, "--ray: CPUs reserved for each generator replica")


@dataclass(frozen=True, kw_only=True)
class ServeCommand(ServeFlags):
    option: list[str] | None = None    # --option key=value, repeatable (method options)

    def spec(self) -> GeneratorSpec:
        method = self.method or (None if self.engine else SERVE_METHOD)
        options = parse_options(self.option or [])
        if self.checkpoint is not None:
            if self.engine is not None or method is None or not METHODS[method].trained:
                raise ValueError(f"--checkpoint is a trained method's (ppd, hybrid, ht) for --model, not "
                                 f"{'an --engine' if self.engine else repr(method)}'s")
            options["checkpoint"] = self.checkpoint
        return GeneratorSpec(self.model, self.engine, method, self.backend, self.device, self.max_context,
                             options, self.max_batch, self.generator_threads())

    def generator_threads(self) -> int | None:
        """--threads, else a Ray replica's CPU share (two replicas on two cores must not each spin up a
        thread per core), else the backend's default."""
        if self.threads is not None:
            return self.threads
        return max(1, int(self.replica_cpus)) if self.ray else None

    def key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def check(self) -> None:
        if self.replicas < 1 or self.queue_size < 1 or self.max_batch < 1:
            raise ValueError(f"--replicas, --queue-size and --max-batch must be >= 1, got {self.replicas}, "
                             f"{self.queue_size}, {self.max_batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        autoscale = (self.min_replicas, self.max_replicas)
        if any(n is not None for n in autoscale):
            if not self.ray or None in autoscale or not 1 <= self.min_replicas <= self.max_replicas:
                raise ValueError("autoscaling needs --ray and 1 <= --min-replicas <= --max-replicas, got "
                                 f"{self.min_replicas}..{self.max_replicas}")


def serve(cfg: ServeCommand) -> int:
    """Run the server until Ctrl-C / SIGTERM."""
    cfg.check()
    spec = cfg.spec()
    model_id = cfg.served_model_name or spec.model_id()   # also checks the model / engine dir exists
    what = f"{spec.engine or spec.model or model_id} ({spec.method or 'its own method'}"
    what += ")" if spec.engine else f" on {spec.backend})"
    if cfg.ray:
        return serve_ray(cfg, spec, model_id)
    import uvicorn

    from runtime.serving.app import create_app
    from runtime.serving.worker import LocalEngine

    engine = LocalEngine(spec.load, cfg.replicas, cfg.queue_size)
    app = create_app(engine, model_id, api_key=cfg.key(), max_body_bytes=cfg.max_body_bytes)
    print(f"serving {what} as model {model_id!r} at http://{cfg.host}:{cfg.port}/v1 "
          f"(/health answers 503 until it has loaded)", file=sys.stderr)
    # On Ctrl-C / SIGTERM uvicorn finishes the open responses, then re-raises the signal (the worker
    # threads are daemons: they end with the process).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0


def serve_ray(cfg: ServeCommand, spec: GeneratorSpec, model_id: str) -> int:
    """Start a local Ray instance and the app (runtime/serving/ray_app.py) on cfg.host:cfg.port; on Ctrl-C
    or SIGTERM shut Serve and Ray down (which ends every process Ray started)."""
    import ray
    from ray import serve as ray_serve

    from runtime.serving.ray_app import APP_NAME, build_app

    ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    stop = threading.Event()   # handlers installed after ray.init, which sets its own SIGTERM one
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray_serve.start(http_options={"host": cfg.host, "port": cfg.port})
        ray_serve.run(build_app(spec, model_id, replicas=cfg.replicas, min_replicas=cfg.min_replicas,
                                max_replicas=cfg.max_replicas, queue_size=cfg.queue_size,
                                replica_cpus=cfg.replica_cpus, api_key=cfg.key(), max_body_bytes=cfg.max_body_bytes),
                      name=APP_NAME, route_prefix="/")
        print(f"serving {model_id!r} on Ray Serve at http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, ServeFlags)
    parser.add_argument("--option", action="append", help="method option key=value (repeatable)")
    parser.set_defaults(config_class=ServeCommand)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: serve(config_from_args(args)), (CheckpointError, FileNotFoundError, ValueError))
