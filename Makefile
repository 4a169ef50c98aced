# ppdeploy: the commands a newcomer runs. Every target sets up what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The model of every target: a packaged one (smollm2-135m-instruct, the default, or gemma3-270m), converted
# by `make model` into artifacts/models/$(MODEL)/; its trained prompt tokens (and HT maps), statistics and
# trees live in checkpoints/$(MODEL)/ (`make train`, `make tree`). Your own model: see README, "Deploy your
# own model".
MODEL ?= smollm2-135m-instruct
MODEL_DIR := artifacts/models/$(MODEL)
MODEL_STAMP := $(MODEL_DIR)/config.json
CHECKPOINT_DIR := checkpoints/$(MODEL)
PPD_CHECKPOINT := $(CHECKPOINT_DIR)/ppd-prompt-tokens.safetensors
HT_CHECKPOINT := $(CHECKPOINT_DIR)/ht-transfer-maps.safetensors
# HT runs where its maps were trained (`make train` trains them; Gemma 3 has PPD's prompt tokens only)
HT := $(wildcard $(HT_CHECKPOINT))

# Target device of `make engine` / `make tree`: cpu, or a GPU by (part of) its name, e.g. GPU=h100.
GPU ?= cpu
# Backend whose step latency the tree is searched for: on cpu our onnxruntime engine; on a GPU the torch
# CUDA step (measured before any TensorRT engine exists; the engine's decode profile is tuned for that tree).
TREE_BACKEND ?= $(if $(filter cpu,$(GPU)),onnxruntime,torch)
# Engine variant of `make engine` / `make tree` (GPU=cpu): fp32, or the weight-only quantized int8 / int4
# (export/quantize.py), whose engines, statistics, latency profile and trees are their own.
QUANT ?= fp32

.PHONY: setup model demo serve serve-ray-deps test test-slow bench bench-ort peers train engine tree gpu-check latency-test latency-baseline clean

setup: $(STAMP) $(MODEL_STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(STAMP)
	$(PY) -m export model --package $(MODEL) --out $(MODEL_DIR)

demo: setup
	$(PY) -m tools demo --model $(MODEL_DIR) --checkpoint $(PPD_CHECKPOINT)

# The OpenAI-compatible server on 127.0.0.1:8000 (`python -m tools serve --help` for the flags).
serve: setup
	$(PY) -m tools serve --model $(MODEL_DIR) --checkpoint $(PPD_CHECKPOINT)

# Ray Serve for `python -m tools serve --ray` and its tests (optional: large, not in requirements.txt).
serve-ray-deps: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[serve-ray]"

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m tools bench --prompts mtbench --methods vanilla,ngram,hf-generate,hf-prompt-lookup --limit 20 --out artifacts/report-mtbench.json

# The peers of `make bench-ort` (optional: not needed by the library or the tests): onnxruntime-genai, and
# llama.cpp (llama-cpp-python built once from its source package, CPU only, for this machine's vector
# extensions named from /proc/cpuinfo with ggml's AMX backend off: tools/peers/llamacpp_build.py; the wheel
# is cached in artifacts/wheels/, the unpacked source keeps llama.cpp's GGUF converter) with the GGUFs of
# the model (f32 and q8_0 converted from the checkpoint, the shipped q4_1), then a short decode of each GGUF
# type in a process of its own, which fails `make peers` naming any type that crashes on this CPU.
LLAMACPP_VERSION := 0.3.36
WHEELS := artifacts/wheels
LLAMACPP_SDIST := $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
LLAMACPP_BUILT := $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION).built-isa
LLAMACPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
PIP_NODEPS := $(PY) -m pip install -q --disable-pip-version-check --no-deps

peers: setup $(LLAMACPP_BUILT)
	$(PIP_NODEPS) onnxruntime-genai==0.18.0 onnx-ir==1.1.0 diskcache==5.6.3 sentencepiece==0.2.1
	$(PY) -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMACPP_VERSION)')" 2>/dev/null || \
		$(PIP_NODEPS) --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
	$(PY) -m tools.peers.llamacpp_gguf --model $(MODEL_DIR)
	$(PY) -m tools.peers.llamacpp_build check --model $(MODEL_DIR)

$(LLAMACPP_SDIST): | $(STAMP)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d $(WHEELS) \
		llama-cpp-python==$(LLAMACPP_VERSION)

$(LLAMACPP_BUILT): $(LLAMACPP_SDIST)
	$(PIP_NODEPS) scikit-build-core==0.11.6 pathspec==0.12.1
	@echo "building llama-cpp-python $(LLAMACPP_VERSION) from source, CPU only (~7 min on 2 cores; once)"
	rm -f $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS) $$($(PY) -m tools.peers.llamacpp_build cmake-args)" \
		nice -n 10 $(PY) -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation -w $(WHEELS) \
		$(LLAMACPP_SDIST)
	$(PIP_NODEPS) --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
	tar -xzf $(LLAMACPP_SDIST) -C $(WHEELS)
	touch $@

bench-ort: peers
	$(PY) -m tools bench --prompts mtbench --backend onnxruntime --methods vanilla,ppd,ht,ngram,ortgenai --limit 20 --out artifacts/report-mtbench-ort.json

# Engine dirs for a device: artifacts/engines/<model>/<GPU>/{vanilla,ppd,ht}/ (export if stale, the
# onnxruntime-optimised graph, and the ppd / ht trees searched for the device). A GPU target, run on that
# GPU, is an fp16 export plus a TensorRT engine (pip install .[tensorrt]); elsewhere it stops before
# writing anything, naming what is missing. QUANT=int8|int4 (GPU=cpu): the weight-only quantized engines
# in <method>-<QUANT>/ beside the fp32 ones (made from an fp32 export with row-exact attention: fp32 scores, fp64 sums; export/quantize.py),
# with that variant's trees.
engine: setup
	$(PY) -m export engine --model $(MODEL_DIR) --target $(GPU) --method vanilla --quantize $(QUANT)
	$(MAKE) tree GPU=$(GPU) QUANT=$(QUANT) MODEL=$(MODEL)
	$(PY) -m export engine --model $(MODEL_DIR) --target $(GPU) --method ppd --checkpoint $(PPD_CHECKPOINT) --quantize $(QUANT)
	$(if $(HT),$(PY) -m export engine --model $(MODEL_DIR) --target $(GPU) --method ht --checkpoint $(HT_CHECKPOINT) --quantize $(QUANT))

# The hardware-aware ppd, ht and hybrid trees for a device and engine variant (QUANT): latency profile
# (measured when missing, shared by the methods; modelled from the GPU's datasheet when that GPU is not
# here: a provisional tree), acceptance and n-gram statistics of the variant (collected when missing, next
# to the checkpoint), then the searches. Written to artifacts/trees/<model>/, nothing when the tree there
# or the committed one was searched from the same inputs; UPDATE_COMMITTED=1 writes the committed files
# next to the checkpoint.
TREE_FLAGS = --model-dir $(MODEL_DIR) --gpu $(GPU) --backend $(TREE_BACKEND) --variant $(QUANT) --stats-if-missing \
	$(if $(UPDATE_COMMITTED),--update-committed)

tree: setup
	$(PY) -m tools trees build --method ppd --checkpoint $(PPD_CHECKPOINT) $(TREE_FLAGS) --profile-if-missing
	$(if $(HT),$(PY) -m tools trees build --method ht --checkpoint $(HT_CHECKPOINT) $(TREE_FLAGS))
	$(PY) -m tools trees build --method hybrid --checkpoint $(PPD_CHECKPOINT) $(TREE_FLAGS)

# Latency regression test of the device present against its committed baseline (exit 1 listing every
# regression; skipped, saying how to record one, without a baseline for this device/backend/versions), and the
# recording of that baseline on a quiet machine (refused when busy). LATENCY_BACKEND: default onnxruntime
# on the CPU, torch on a GPU.
LATENCY_FLAGS = --gpu $(GPU) $(if $(LATENCY_BACKEND),--backend $(LATENCY_BACKEND))

latency-test: setup
	$(PY) -m tools latency-test $(LATENCY_FLAGS)

latency-baseline: setup
	$(PY) -m tools latency-baseline $(LATENCY_FLAGS)

# The one check a borrowed GPU machine runs (one call, 6 min): bf16 profile, trees, benches in bf16 and fp32
# with the compiled transformers peer, CUDA tests, batched throughput, latency baseline, roofline, TensorRT
# when importable; report in reports/gpu-check/<device>/ (committed). Without CUDA it prints the plan.
gpu-check: setup
	$(PY) -m tools gpu-check

train: setup
	$(PY) -m train ppd --model-dir $(MODEL_DIR) --output $(PPD_CHECKPOINT)
	$(PY) -m train ht --model-dir $(MODEL_DIR) --output $(HT_CHECKPOINT)

clean:
	rm -rf $(VENV) artifacts
