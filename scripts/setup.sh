#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with torch 2.13.0 (installed FIRST: a bare `torch` requirement on a
# machine without torch would pull gigabytes of CUDA wheels), then dpcompile with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
