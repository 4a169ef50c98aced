"""The serving fixtures (a tiny model behind a real server on loopback) for the server's command line
and load generator: the same ones tests/runtime/serving uses."""

from tests.runtime.serving.conftest import make_generator, one_torch_thread, reference, served  # noqa: F401
