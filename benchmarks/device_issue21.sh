#!/usr/bin/env bash
# Issue 21 checks of 2026-12-07 in one device call (NOTES 29-30): the new GPU tests, the compile time with and
# without the memoized kernel analysis (codegen/mutation_cache.py), and the step with cuDNN attention for
# batch-only graphs and with Inductor's combo kernels. Full outputs under $OUT; the short table prints last.
#   bash benchmarks/device_issue21.sh [tests] [phases] [bench]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
[ $# -gt 0 ] || set -- tests phases bench
summary=()
for stage in "$@"; do
  case "$stage" in
    tests)
      timeout 90 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py \
        -k "memoized or bf16_autocast" > "$OUT/tests.txt" 2>&1
      summary+=("tests: $(tail -1 "$OUT/tests.txt")") ;;
    phases)  # one mode, empty then warm caches, with and without the memoized analysis
      for cache in 1 0; do
        DPCOMPILE_MUTATION_CACHE=$cache timeout 200 python3 benchmarks/compile_phases.py --model gpt2-small --B 8 \
          --T 1024 --modes per_layer-static --warm --out "$OUT/phases_cache$cache.json" \
          > "$OUT/phases_cache$cache.log" 2>&1
        summary+=("phases cache=$cache: $(grep -m1 'first step minus' "$OUT/phases_cache$cache.log")")
        summary+=("  bw_compiler: $(grep -m1 'bw_compiler' "$OUT/phases_cache$cache.log")")
      done ;;
    bench)
      timeout 190 python3 benchmarks/harness.py --workloads "gpt2-small B=8 T=1024" --modes \
        "non-DP compiled,flashdp per_layer dynamic_seq=False,non-DP compiled+combo,flashdp per_layer dynamic_seq=False+combo" \
        --parallel 4 --timeout 180 --profile --out "$OUT/bench" > "$OUT/bench.log" 2>&1
      summary+=("bench rc=$?"); [ -f "$OUT/bench/table.md" ] && summary+=("$(cat "$OUT/bench/table.md")") ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
printf '%s\n' "${summary[@]}"
