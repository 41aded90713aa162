#!/usr/bin/env bash
# Everything a GPU session checks, as one prepared script (device time is scarce): the CUDA-only
# tests (pytest -m gpu: CUDA training step, checkpoint onto CUDA, STN, kNN, classify-archive's
# GPU workers against the CPU loop), then benchmarks/gpu_classify.sh. Results go to OUT.
#
#   OUT=results/bench bash benchmarks/gpu_session.sh
#
# Environment as for gpu_classify.sh; pytest must be importable (else the tests are reported as
# not run, and the benchmark still runs).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$REPO/results/bench}"
mkdir -p "$OUT"

echo "== CUDA tests (pytest -m gpu)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout "${TEST_TIMEOUT:-150}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests \
    2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
else
  echo "pytest is not importable here: CUDA tests not run" | tee "$OUT/gpu_tests.log"
fi

echo "== benchmark"
OUT="$OUT" bash benchmarks/gpu_classify.sh
