# Two entry points do all set-up on a fresh machine:
#   make demo   installs into .venv and runs `semisup demo`
#   make test   installs into .venv and runs lint, types and the test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
PYTEST_ARGS ?= -m "not slow and not gpu"

.PHONY: demo test test-all lint bench clean

$(BIN)/semisup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# (grep hides pip's notes about absent local mirrors; pipefail keeps pip's own status)
	$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import semisup, data_prep, tune_spaces, ray, torch, torchvision, zarr, onnx, onnxruntime, onnxscript"
	touch $@

demo: $(BIN)/semisup
	@if [ -e $(DEMO_OUT) ]; then echo "replacing the previous demo outputs in $(DEMO_OUT)"; rm -rf $(DEMO_OUT); fi
	$(BIN)/semisup demo --out $(DEMO_OUT)

lint: $(BIN)/semisup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-all: lint
	$(BIN)/pytest -m "not gpu"

bench: $(BIN)/semisup
	$(BIN)/python bench/bench_stream.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
