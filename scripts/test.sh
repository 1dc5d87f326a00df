#!/usr/bin/env bash
# Set up (idempotent, see scripts/setup.sh) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k render`.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER="${WITH_BROWSER:-1}" bash scripts/setup.sh
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
exit $rc
