#!/usr/bin/env bash
# Set up (idempotent, see scripts/setup.sh) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k render`.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER="${WITH_BROWSER:-1}" bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # no gain from 2 threads here, and no stalls when tests run ns-train beside pytest
exec .venv/bin/python -m pytest -q "$@"
