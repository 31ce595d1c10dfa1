# Two commands on a fresh machine:  make demo  |  make test
# Set-up makes a virtual environment, installs the CPU build of torch 2.13.0 when no torch is
# present (an unpinned torch would pull a multi-GB CUDA build), then the project and its extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,geospatial,chemistry,immunology,physics,robotics
# This machine keeps the CPU torch wheel on disk; pip finds it here when the directory exists.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP  := $(VENV)/.sciscope-installed-$(EXTRAS)

.PHONY: setup demo walkthrough test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(FIND_LINKS) -e ".[$(EXTRAS)]"
	@touch $@

demo: setup
	$(BIN)/sciscope run geospatial --profile quick

walkthrough: setup
	$(BIN)/python -m sciscope.pipelines.demo --out runs/walkthrough

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/bench_capture_overhead.py
	$(BIN)/python benchmarks/bench_probe_sweep.py
	$(BIN)/python benchmarks/bench_sae_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
