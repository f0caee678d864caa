# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds whose wheels ship on this kind of machine (pip finds them on its disk).
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

# Each tier prints its --durations table and wall time (budgets: 8 and 12 minutes on 2 cores).
test: setup
	bash tests/run_tier.sh $(BIN)/python "tier 1 (unit + local end to end)" -m "not cluster"
	bash tests/install_bed_tools.sh                                     # ip/tc, sshd, rsync for the hosts, if missing
	bash tests/run_tier.sh $(BIN)/python "cluster tier (own clusters and hosts)" -m cluster

bench: setup
	$(BIN)/python jobs/benchmark.py step

# The first run on a CUDA machine, in one go within 10 minutes: preflight, step table, training from local shards and
# loopback S3, decode vs step, a resume, NCCL (docs/performance.md). One JSON in outputs/bench/gpu.json.
bench-gpu: setup
	mkdir -p outputs/bench
	RAY_AUTH_MODE=disabled timeout 600 $(BIN)/python jobs/benchmark.py gpu --json outputs/bench/gpu.json

clean:
	rm -rf $(VENV) data/ mlflow.db ray_results/ outputs/
