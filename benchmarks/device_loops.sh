#!/usr/bin/env bash
# Issue 19 on the device machine, in one call: versions, the GPU tests, the variable-shape benchmark and the
# fixed-shape harness rows (compile time included). Stages are chosen by name, e.g.
#   bash benchmarks/device_loops.sh check tests "vary:gpt2-small" "vary:llama-1b" "bench:gpt2-small B=8 T=1024"
# Full outputs go to $OUT (tests.txt, vary_*.log, variable_shapes_*.jsonl, bench_*/); a short summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
summary=()
[ $# -gt 0 ] || set -- check tests "vary:gpt2-small"
for stage in "$@"; do
  case "$stage" in
    check)
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
      summary+=("versions: $(tail -1 "$OUT/versions.txt")") ;;
    tests|tests:*)  # tests:FILES (space-separated) runs those files only
      files=${stage#tests}; files=${files#:}
      timeout 420 python3 -m pytest -q -n 8 -p no:cacheprovider \
        ${files:-tests/test_gpu.py tests/test_clip_provenance.py tests/test_dynamic_shapes.py} > "$OUT/tests.txt" 2>&1
      summary+=("tests: $(tail -1 "$OUT/tests.txt")") ;;
    vary:*)  # vary:MODEL[:MODES]
      IFS=: read -r _ model modes <<< "$stage"
      timeout 560 python3 benchmarks/bench_variable_shapes.py --model "$model" ${modes:+--modes "$modes"} ${VARY_FLAGS:-} \
        --out "$OUT" > "$OUT/vary_$model.log" 2>&1
      summary+=("vary $model rc=$?"); sed -n '/^| /,$p' "$OUT/vary_$model.log" ;;
    bench:*)  # bench:WORKLOAD[:MODES[:PARALLEL]]
      IFS=: read -r _ wl modes par <<< "$stage"
      dir="$OUT/bench_$(echo "$wl${modes:+_$modes}" | tr -c 'a-zA-Z0-9.\n' '_' | cut -c1-60)"
      python3 benchmarks/harness.py --workloads "$wl" --modes "${modes:-non-DP compiled,flashdp per_layer}" \
        --parallel "${par:-2}" --timeout 400 --out "$dir" ${BENCH_FLAGS:-} > "$dir.log" 2>&1
      summary+=("bench $wl rc=$?"); cat "$dir/table.md" 2>/dev/null ;;
    phases:*)  # phases:MODEL:B:T[:MODES] (compile_phases.py: where the first step's compile time goes)
      IFS=: read -r _ model b t modes <<< "$stage"
      timeout 560 python3 benchmarks/compile_phases.py --model "$model" --B "$b" --T "$t" ${modes:+--modes "$modes"} \
        --out "$OUT/phases_$model.json" > "$OUT/phases_$model.log" 2>&1
      summary+=("phases $model rc=$?"); sed -n '/^| /,$p' "$OUT/phases_$model.log" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
