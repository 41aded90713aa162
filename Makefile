# The README's contract: `make demo` and `make test` set themselves up on a machine with only Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: help setup test lint format demo bench ablation clean

help:
	@echo "make demo   - set up and run the whole pipeline on a synthetic archive (outputs in $(DEMO_DIR)/)"
	@echo "make test   - set up, lint and run the test suite"
	@echo "make bench  - run the benchmarks in benchmarks/ (prints ratios, writes results/bench/)"
	@echo "make ablation - train and evaluate every variant on one synthetic split (results/ablation.md)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks workflows scripts
	$(VENV)/bin/ruff format --check pipeline tests benchmarks workflows scripts

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline tests benchmarks workflows scripts
	$(VENV)/bin/ruff check --fix pipeline tests benchmarks workflows scripts

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/aurora-pipeline run workflows/demo.yaml --set out=$(DEMO_DIR)

bench: $(STAMP)
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

ablation: $(STAMP)
	$(PY) scripts/ablation.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
