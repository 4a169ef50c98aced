"""`python -m tools serve` (cli.py: flags, the in-process and Ray Serve startup) and
`python -m tools.serving.loadgen` (a bounded load test of a running server)."""
