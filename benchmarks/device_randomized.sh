#!/usr/bin/env bash
# Issue 5 on the device machine, in one call: GPU tests of the randomized kernels, the per-kernel sweep, and the
# long-context step benchmark. Stages are chosen by name (default: all three), e.g.
#   bash benchmarks/device_randomized.sh tests sweep "bench:gpt2-small B=2 T=16384"
# BENCH_FLAGS adds flags to the bench stages (e.g. --profile: one profiled step per mode, kernels in the log).
# Full outputs go to $OUT (tests.txt, randomized_sweep.json, sweep.txt, bench_*/); a short summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
MODES="non-DP compiled,flashdp per_layer strategy=randomized,flashdp per_layer"
summary=()
[ $# -gt 0 ] || set -- tests sweep "bench:gpt2-small B=2 T=16384"
for stage in "$@"; do
  case "$stage" in
    tests|tests:*)  # tests:EXPR runs only the tests pytest -k EXPR selects
      k=${stage#tests}; k=${k#:}
      timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_randomized_*.py ${k:+-k "$k"} \
        > "$OUT/tests.txt" 2>&1
      summary+=("tests: $(tail -1 "$OUT/tests.txt")") ;;
    sweep|sweep:*)  # sweep:project or sweep:bt_z times only that kernel
      which=${stage#sweep}; which=${which#:}
      timeout 300 python3 benchmarks/bench_randomized_ops.py --sweep ${which:-all} --out "$OUT" > "$OUT/sweep.txt" 2>&1
      summary+=("sweep rc=$?"); sed -n '/^| site | kernel/,$p' "$OUT/sweep.txt" ;;
    ops)
      timeout 240 python3 benchmarks/bench_randomized_ops.py --out "$OUT" > "$OUT/ops.txt" 2>&1
      summary+=("ops rc=$?") ;;
    bench:*)  # bench:WORKLOAD[:MODES[:PARALLEL]]
      IFS=: read -r _ wl modes par <<< "$stage"
      dir="$OUT/bench_$(echo "$wl${modes:+_$modes}" | tr -c 'a-zA-Z0-9.\n' '_' | cut -c1-60)"
      python3 benchmarks/harness.py --workloads "$wl" --modes "${modes:-$MODES}" --parallel "${par:-3}" \
        --timeout 400 --out "$dir" ${BENCH_FLAGS:-} > "$dir.log" 2>&1
      summary+=("bench $wl rc=$?"); cat "$dir/table.md" 2>/dev/null ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
