# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds that ship on this kind of machine (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/python jobs/train.py

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python jobs/benchmark.py step

clean:
	rm -rf $(VENV) data/ mlflow.db ray_results/ outputs/
