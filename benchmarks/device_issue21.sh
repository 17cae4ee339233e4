#!/usr/bin/env bash
# Issue 21 checks in one device call (NOTES 33): the compile phases with empty then warm caches (or under cProfile),
# and where the DP step's host time goes (cProfile of five steps per mode, or the forward/backward/optimizer split
# of the enqueue time with the step's syncs), with and without Inductor's CUDA graphs, each DP row against non-DP
# in the same run. Full outputs under $OUT; the short table prints last.
#   bash benchmarks/device_issue21.sh [tests] [phases] [cprofile] [host] [split] [kernels] [opt] [reduce] [ab]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
[ $# -gt 0 ] || set -- phases host
summary=()
for stage in "$@"; do
  case "$stage" in
    tests)
      # GPU_TESTS: other test files (default: test_gpu.py); GPU_K: a -k selection among their tests
      timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu.py} \
        ${GPU_K:+-k "$GPU_K"} > "$OUT/tests.txt" 2>&1
      summary+=("tests: $(tail -1 "$OUT/tests.txt")") ;;
    phases)  # empty then warm caches (a user's first and second run); PHASES_MODES: other modes, each alone on
             # the GPU with empty caches (e.g. non-DP,non-DP-dynamic-static,per_layer-static: compile-time ratios)
      warm=--warm; [ -n "${PHASES_MODES:-}" ] && warm=
      timeout ${PHASES_TIMEOUT:-200} python3 benchmarks/compile_phases.py --model gpt2-small --B 8 --T 1024 \
        --modes ${PHASES_MODES:-per_layer-static} $warm --out "$OUT/phases.json" > "$OUT/phases.log" 2>&1
      summary+=("$(sed -n '/^| phase/,/bw_compiler/p' "$OUT/phases.log")")
      summary+=("$(grep -E 'DP pass|GraphLowering|aot_trace_joint' "$OUT/phases.log")") ;;
    cprofile)  # the first step under cProfile, non-DP and DP: $OUT/prof/<mode>.pstats for reading offline
      timeout 300 python3 benchmarks/compile_phases.py --model gpt2-small --B 8 --T 1024 --modes non-DP,per_layer-static \
        --cprofile "$OUT/prof" --out "$OUT/cprofile.json" > "$OUT/cprofile.log" 2>&1
      summary+=("cprofile: $(grep -m1 'first step minus' "$OUT/cprofile.log")") ;;
    split)  # the enqueue time split by phase, the syncs a step, and one profiled step (launch counts)
      timeout 280 python3 benchmarks/harness.py --workloads "gpt2-small B=8 T=1024" --modes \
        "non-DP compiled,flashdp per_layer dynamic_seq=False,non-DP compiled+cudagraphs,flashdp per_layer dynamic_seq=False+cudagraphs" \
        --parallel 4 --timeout 270 --profile --out "$OUT/split" > "$OUT/split.log" 2>&1
      summary+=("split rc=$?"); [ -f "$OUT/split/table.md" ] && summary+=("$(cat "$OUT/split/table.md")")
      summary+=("$(python3 -c "import json; [print(r['mode'], {k: round(v, 2) for k, v in r.items() if k.startswith('host_') or k in ('syncs', 'gpu_ms')}) for r in json.load(open('$OUT/split/results.json'))]")") ;;
    kernels)  # Inductor's generated code of one DP step (empty caches): which kernel serves which site
      TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCH_LOGS=output_code timeout 200 python3 benchmarks/compile_phases.py \
        --one per_layer-static --model gpt2-small --B 8 --T 1024 > "$OUT/output_code.log" 2>&1
      gzip -f "$OUT/output_code.log"; summary+=("kernels: $(ls -la "$OUT/output_code.log.gz")") ;;
    ab)  # the DP row against non-DP under this code and under another snapshot's (AB_BASE: its directory, carried
         # beside this one), one after the other on the same GPU: what one change moved, each with its own baseline
      for side in ${AB_SIDES:-base this}; do  # AB_SIDES=this: only this snapshot (its own non-DP baseline)
        dir=$PWD; [ "$side" = base ] && dir=$(cd "${AB_BASE:?ab needs AB_BASE, a snapshot directory}" && pwd)
        (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 280 python3 benchmarks/harness.py --workloads "gpt2-small B=8 T=1024" \
          --modes "non-DP compiled,flashdp per_layer dynamic_seq=False" --parallel 2 --timeout 270 --profile \
          --out "$OUT/ab_$side" > "$OUT/ab_$side.log" 2>&1)
        summary+=("ab $side (code of $(cat "$dir/COMMIT" 2>/dev/null || basename "$dir")):")
        [ -f "$OUT/ab_$side/table.md" ] && summary+=("$(cat "$OUT/ab_$side/table.md")")
      done ;;
    opt)  # DPOptimizer.step's host time by part against AdamW's (bench_optimizer_host.py)
      timeout 200 python3 benchmarks/bench_optimizer_host.py --model gpt2-small --B 8 --T 1024 \
        --out "$OUT/opt.json" > "$OUT/opt.log" 2>&1
      summary+=("opt rc=$?" "$(grep -A20 'host ms a step' "$OUT/opt.log")") ;;
    reduce)  # the stored products' clipped sum per tile shape (bench_scaled_reduce.py)
      timeout 120 python3 benchmarks/bench_scaled_reduce.py --out "$OUT/reduce.json" > "$OUT/reduce.log" 2>&1
      summary+=("reduce rc=$?" "$(sed -n '/^| shape/,$p' "$OUT/reduce.log")") ;;
    host)  # the step's Python, per mode (harness --host-profile prints cProfile's top functions to the log)
      timeout 280 python3 benchmarks/harness.py --workloads "gpt2-small B=8 T=1024" --modes \
        "non-DP compiled,flashdp per_layer dynamic_seq=False,non-DP compiled+cudagraphs,flashdp per_layer dynamic_seq=False+cudagraphs" \
        --parallel 4 --timeout 270 --host-profile --out "$OUT/host" > "$OUT/host.log" 2>&1
      summary+=("host rc=$?"); [ -f "$OUT/host/table.md" ] && summary+=("$(cat "$OUT/host/table.md")") ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
printf '%s\n' "${summary[@]}"
