# Set-up and entry points. `make repro` rebuilds the pipeline, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, on its own: on PyPI a bare `torch` is the multi-GB CUDA build.
# Elsewhere than the dev machines, pass e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install system repro test bench bench-accuracy bench-yardstick clean-venv

install: system $(VENV)/.installed

# Debian packages (fonts, Chromium for the browser test): installed where root, named where not
system:
	@bash setup/debian.sh

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

# unseen captcha styles: the model zero-shot and fine-tuned on 1,000 labels, and ddddocr
bench-yardstick: install
	$(BIN)/python -m benchmarks.yardstick --model ddddocr --model models/model.pt --ddddocr --finetune 1000 --minutes 10

clean-venv:
	rm -rf $(VENV)
