"""Peers the bench compares with: llama.cpp (llamacpp.py, its GGUFs in llamacpp_gguf.py),
onnxruntime-genai (ortgenai.py) and transformers' generate; each runs in a process of its own."""
