#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole CPU suite on all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pytest -q -n auto tests "$@"
