# Set-up and entry points. `make repro` rebuilds the pipeline, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, on its own: on PyPI a bare `torch` is the multi-GB CUDA build.
# Elsewhere than the dev machines, pass e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test bench bench-accuracy clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_INDEX) torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.speed

bench-accuracy: install
	$(BIN)/python -m benchmarks.accuracy

clean-venv:
	rm -rf $(VENV)
