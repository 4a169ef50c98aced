"""The tools floor: what measures, searches, benchmarks and compares the runtime core, and the command
line (`python -m tools ...`). It imports the core (runtime/, export/, trees/, train/); nothing there
imports it.

    commands.py    `python -m tools {generate,demo,bench,memory,quality,floor,breakdown,...}`
    bench/         the benchmark harness, its run labels and prompt sets, memory and quality reports
    peers/         llama.cpp, onnxruntime-genai and transformers as bench peers, each in its own process
    treesearch/    acceptance statistics, latency profiles and the hardware-aware tree search (`trees`)
    latency/       step latency profiles, the latency regression test, the bandwidth floor, step breakdown
    parity/        recorded real step inputs compared across runners with Polygraphy (`check`)
    serving/       `serve` (the server's flags and startup) and the load generator
    gpu_check.py   the one check a borrowed GPU machine runs (`gpu-check`)
"""
