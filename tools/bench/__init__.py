"""The benchmark harness (harness.py), its run labels (labels.py), prompt sets (prompts.py), peak
memory per method (memory.py) and the quantized engines' quality against fp32 (quality.py)."""
