"""`python -m tools check ENGINE_DIR`: real step inputs recorded with the real model (recorder.py),
compared across runners (torch, onnxruntime, TensorRT) with Polygraphy (compare.py)."""
