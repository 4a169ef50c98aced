"""Serving: an OpenAI-compatible HTTP server over runtime.BatchGenerator (started by `python -m tools
serve`, tools/serving/cli.py; load-tested by `python -m tools.serving.loadgen`).

    schemas.py    request models (strict, bounded), the OpenAI error shape
    jobs.py       one generation: prepare (encode + budget), its progress in a batch, its events, stop trimming
    worker.py     LocalEngine: one worker thread per BatchGenerator, a bounded queue (429), cancellation
    responses.py  OpenAI response bodies and SSE chunks
    metrics.py    Prometheus metrics
    app.py        create_app(engine, model_id, ...): the FastAPI routes, auth, body limits
    spec.py       GeneratorSpec: what to load, picklable for Ray replicas
    ray_app.py    the same app as a Ray Serve ingress over generator replicas (optional extra)
"""

from runtime.serving.app import create_app
from runtime.serving.worker import LocalEngine

__all__ = ["LocalEngine", "create_app"]
