# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv and install what they need; torch is pinned to the local CPU wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $(STAMP)

.PHONY: install demo test lint gpu-check gpu-check-dry-run
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/coap-compile demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The offline GPU check (README "GPU checks"): the machine's own python and torch, no venv, no downloads.
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m coap_lab.gpucheck $(ARGS)

gpu-check-dry-run:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m coap_lab.gpucheck --dry-run $(ARGS)
