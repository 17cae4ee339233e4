# Source on the device machine: wheels this project needs that the GPU image lacks (carried in .whl/, see README).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "WARNING" || true
export PYTHONPATH=/tmp/site:$PWD
# What every device script shares: unbuffered logs, and $OUT (the call's output folder, else a scratch one).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dpcompile-out}
mkdir -p "$OUT"
