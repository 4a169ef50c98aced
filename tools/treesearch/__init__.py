"""`python -m tools trees`: what the hardware-aware tree search measures (acceptance and n-gram
statistics, latency profiles), the search's inputs and outputs on disk, the build, the measured sweep,
and the datasheet roofline for GPUs that are not here. The search itself is trees/ (pure)."""
