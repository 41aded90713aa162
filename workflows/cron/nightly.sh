#!/bin/bash
# The nightly incremental run: scan the archive, classify frames newer than the last run,
# recompute the occurrence statistics. flock keeps two runs from overlapping (the runner also
# holds its own lock); a run that finds the lock taken exits at once.
set -euo pipefail
REPO=${AURORA_REPO:-$HOME/aurora-pipeline}
LOCK=${AURORA_LOCK:-/tmp/aurora-nightly.lock}
cd "$REPO"
exec flock --nonblock --conflict-exit-code 75 "$LOCK" \
    .venv/bin/aurora-pipeline run workflows/nightly.yaml "$@"
