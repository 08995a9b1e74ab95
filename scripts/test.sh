#!/usr/bin/env bash
# The test suite (CPU; 8 fake devices). Extra args go to pytest (e.g. -k convert, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu
# Tests marked slow cover again what another test covers; TEST_MARKERS= (empty) runs them too.
exec .venv/bin/python -m pytest -q -n 2 --durations=15 -m "${TEST_MARKERS-not slow}" "$@" tests
