# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds that ship on this kind of machine (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench bench-gpu clean

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
	$(BIN)/python -m pytest -q tests -m "not cluster" --durations=15   # unit + local end to end: <= 8 min
	bash tests/install_bed_tools.sh                                     # ip/tc, sshd, rsync for the hosts, if missing
	$(BIN)/python -m pytest -q tests -m cluster --durations=5          # own clusters and hosts: the multi-host budget

bench: setup
	$(BIN)/python jobs/benchmark.py step

# Every benchmark on a CUDA machine, JSON in outputs/bench/ (see docs/performance.md for what each measures).
bench-gpu: setup
	mkdir -p outputs/bench
	$(BIN)/python jobs/benchmark.py step --device cuda --batches 64 128 512 --steps 50 \
		--variant fp32=train.precision=fp32 --variant fused=train.fused_adam=true --json outputs/bench/step.json
	$(BIN)/python jobs/benchmark.py step --device cuda --resolutions 64 --batches 128 --steps 50 \
		--variant compiled=train.compile=default --variant graphs=train.compile=reduce-overhead \
		--json outputs/bench/step_compile.json
	$(BIN)/python jobs/benchmark.py scaling --json outputs/bench/scaling.json
	$(BIN)/python jobs/benchmark.py data --json outputs/bench/data.json

clean:
	rm -rf $(VENV) data/ mlflow.db ray_results/ outputs/
