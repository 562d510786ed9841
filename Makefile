# Everything a fresh machine needs: a venv, the CPU torch wheel, the package, the real tokenizer assets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup assets demo test bench clean

# setup.py compiles the bridge's bookkeeping (Cython, in place): an edit to its sources rebuilds it here
# (an edited checkout that is not rebuilt runs the Python source, with a warning)
COMPILED := setup.py $(wildcard rsd_toolkit/bridges/*.pxd) rsd_toolkit/bridges/incremental.py \
	rsd_toolkit/bridges/pair.py rsd_toolkit/bridges/batch.py rsd_toolkit/bridges/_compiled.py

$(STAMP): pyproject.toml $(COMPILED)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/rsd assets fetch --group tokenizers --group smollm2

demo: assets
	$(BIN)/rsd demo

test: assets
	$(BIN)/python -m pytest -q

bench: assets
	$(BIN)/python benchmarks/bench_bridges.py --json
	$(BIN)/python benchmarks/bench_engine.py --json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build rsd_toolkit/bridges/*.so rsd_toolkit/bridges/_compiled.json
