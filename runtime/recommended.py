"""The fastest lossless configuration this project has measured on its machine: what `make demo`
shows and `python -m runtime serve` serves by default (one home for both).

Measured 2026-11-30 on the project's quiet 2-core CPU (`cpu: AMD EPYC (2 cores, 2 threads)`),
onnxruntime backend, MT-Bench x 10 prompts, 128 new tokens, 3 interleaved rounds: vanilla 51.5
tokens/s, ppd 54.4 (1.06x), ngram 60.1 (1.17x); on the torch backend no tree pays on this CPU.
Re-measure on new hardware with
`python -m runtime bench --backend onnxruntime --methods vanilla,ppd,ngram,hybrid --limit 10`.
"""

FASTEST_METHOD = "ngram"
FASTEST_BACKEND = "onnxruntime"
