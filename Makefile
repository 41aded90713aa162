# The README's contract: `make demo` and `make test` set themselves up on a machine with only Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: help setup test test-matrix lint format demo bench ablation clean

help:
	@echo "make demo   - set up and run the whole pipeline on a synthetic archive (outputs in $(DEMO_DIR)/)"
	@echo "make test   - set up, lint and run the test suite"
	@echo "make test-matrix - the tests under other CPU kernels, thread counts, BLAS cores, random order"
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

# The suite on one machine under what changes between machines: ATen's and MKL's/oneDNN's CPU
# kernels (ISA=default is the scalar/SSE path, avx2 the AVX2 one), 1 and 2 torch threads (how
# reductions are split), numpy's OpenBLAS core (unset, i.e. detected: Haswell on an EPYC, or the
# older MATRIX_CORE), and once in a random order (pytest-randomly). Not in CI: the full matrix is
# nine suites (an hour on 2 cores); MATRIX_TESTS="tests/test_retrieval.py ..." runs some files.
# Fails if any run failed.
MATRIX_TESTS ?=
MATRIX_CORE ?= Sandybridge

test-matrix: $(STAMP)
	@failed=""; \
	for isa in default avx2; do \
	  case $$isa in default) mkl=SSE4_2; dnn=SSE41;; *) mkl=AVX2; dnn=AVX2;; esac; \
	  for threads in 1 2; do \
	    for core in unset $(MATRIX_CORE); do \
	      name="ATEN_CPU_CAPABILITY=$$isa AURORA_TEST_TORCH_THREADS=$$threads OPENBLAS_CORETYPE=$$core"; \
	      echo "== $$name"; \
	      blas=""; [ $$core = unset ] || blas="OPENBLAS_CORETYPE=$$core"; \
	      env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $$blas ATEN_CPU_CAPABILITY=$$isa \
	        MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$dnn AURORA_TEST_TORCH_THREADS=$$threads \
	        $(PY) -m pytest -q $(PYTEST_ARGS) $(MATRIX_TESTS) || failed="$$failed|$$name"; \
	    done; \
	  done; \
	done; \
	echo "== random order (pytest-randomly: its seed is in the header; rerun with --randomly-seed=N)"; \
	$(PY) -m pytest -p randomly $(PYTEST_ARGS) $(MATRIX_TESTS) || failed="$$failed|random order"; \
	if [ -n "$$failed" ]; then echo "test-matrix FAILED under:$$failed" | tr '|' '\n'; exit 1; fi; \
	echo "test-matrix: all 9 runs passed"

demo: $(STAMP)
	$(VENV)/bin/aurora-pipeline run workflows/demo.yaml --set out=$(DEMO_DIR)

bench: $(STAMP)
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

ablation: $(STAMP)
	$(PY) scripts/ablation.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
