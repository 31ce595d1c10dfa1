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

.PHONY: setup demo walkthrough test bench bench-dictlearn bench-test clean

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

# The peer libraries (SAELens, nnsight, steering-vectors, TransformerLens) need an older transformers
# (SAELens pins it), so the benchmarks get their own environment; the project is installed there
# too (editable).
BENCH_VENV   := .venv-bench
BENCH_BIN    := $(BENCH_VENV)/bin
BENCH_EXTRAS := bench,geospatial
# pytest too: the SAELens interchange tests (tests/core/test_sae_formats.py, `make bench-test`)
# need the real SAELens, which only this environment has. The stamp names what was installed, so
# an environment made before pytest was added here is topped up instead of silently lacking it.
BENCH_TEST_PKGS := "pytest>=8"
BENCH_STAMP  := $(BENCH_VENV)/.sciscope-bench-installed-$(BENCH_EXTRAS)-pytest
# on a loaded machine: make bench BENCH_ARGS="--threads 1"
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml
	@test -x $(BENCH_BIN)/python || $(PYTHON) -m venv $(BENCH_VENV)
	@$(BENCH_BIN)/python -c "import torch" 2>/dev/null || $(BENCH_BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BENCH_BIN)/pip install -q $(FIND_LINKS) -e ".[$(BENCH_EXTRAS)]" $(BENCH_TEST_PKGS)
	@touch $@

bench: $(BENCH_STAMP)
	$(BENCH_BIN)/python benchmarks/bench_sae_vs_saelens.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_capture_vs_nnsight.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_capture_vs_transformerlens.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_steering_vectors.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_probe_sweep.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_capture_memory.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_capture_overhead.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_sae_throughput.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_sae_bf16.py $(BENCH_ARGS)
	$(BENCH_BIN)/python benchmarks/bench_store_obs_memory.py
	$(MAKE) bench-dictlearn BENCH_ARGS='$(BENCH_ARGS)'

# dictionary_learning (saprmarks' SAE library, an SAE-training peer) pins nnsight < 0.4, which the
# bench environment's nnsight contradicts, so it gets an environment of its own. Torch first (the
# CPU wheel on disk), so that the library's unpinned torch cannot pull a CUDA build; sciscope
# editable with the geospatial extra, which the place-name activations need.
DICTLEARN_VENV  := .venv-dictlearn
DICTLEARN_BIN   := $(DICTLEARN_VENV)/bin
DICTLEARN_STAMP := $(DICTLEARN_VENV)/.sciscope-dictlearn-installed-geospatial

$(DICTLEARN_STAMP): pyproject.toml
	@test -x $(DICTLEARN_BIN)/python || $(PYTHON) -m venv $(DICTLEARN_VENV)
	@$(DICTLEARN_BIN)/python -c "import torch" 2>/dev/null || $(DICTLEARN_BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(DICTLEARN_BIN)/pip install -q $(FIND_LINKS) torch==2.13.0 dictionary-learning -e ".[geospatial]"
	@# nnsight 0.3 requires torchvision, whose wheel from the index does not match the CPU torch
	@# ("operator torchvision::nms does not exist"), and transformers then fails to import its
	@# models; nothing on the SAE-training path uses torchvision, so it is removed again.
	$(DICTLEARN_BIN)/pip uninstall -y -q torchvision
	@touch $@

bench-dictlearn: $(DICTLEARN_STAMP)
	$(DICTLEARN_BIN)/python benchmarks/bench_sae_vs_dictionary_learning.py $(BENCH_ARGS)

# the tests that need SAELens (skipped in the main environment), run where it is installed
bench-test: $(BENCH_STAMP)
	$(BENCH_BIN)/python -m pytest -q -p no:cacheprovider tests/core/test_sae_formats.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DICTLEARN_VENV) runs .pytest_cache
