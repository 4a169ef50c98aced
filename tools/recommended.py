"""The fastest lossless configuration this project has measured on its machine: what `make demo`
shows and `python -m tools serve` serves by default (one home for both).

Measured 2026-12-01 on the project's quiet 2-core CPU (`cpu: AMD EPYC (2 cores, 2 threads)`),
onnxruntime backend (threads spinning during a run), fp32, MT-Bench x 10 prompts, 128 new tokens,
median of 2 interleaved rounds: vanilla 65.8 tokens/s, ppd 67.4 (1.03x), ngram 69.9 (1.06x), hybrid
77.3 (1.17x, 1.57 tokens/step); every output identical to vanilla. (2026-11-30, before spinning and
the re-searched trees: vanilla 51.5, ppd 54.4, ngram 60.1.) On the torch backend no tree pays on this
CPU. The quantized engines are faster still (README "Quantized engines"), but their outputs are the
quantized model's, so they are never a default. Re-measure on new hardware with
`python -m tools bench --backend onnxruntime --methods vanilla,ppd,ngram,hybrid --limit 10`.
"""

FASTEST_METHOD = "hybrid"
FASTEST_BACKEND = "onnxruntime"
