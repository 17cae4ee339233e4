"""Batches that change shape every step (issue 19): Poisson batch sizes and per-batch padding to the longest text.

Each mode runs in its own process (so compile time is measured cold for every mode) on one step sequence:
  B_k ~ Poisson(8), T_k = the longest of B_k lengths drawn from a real length distribution
  (benchmarks/data/shakespeare_passage_lengths.json: the training passages of the CLI's corpus, tokenized with
  SmolLM2's tokenizer). Token ids are random: the shapes, not the text, set the cost.

Modes: "fixed non-DP" / "fixed DP" (B = 8, T = the sequence's mean padded T, every step), "variable non-DP" /
"variable DP" (the sequence), "pad-to-max DP" (the sequence's B_k, every batch padded to T = 1024).
Reported per mode: graphs compiled, compile time (the steps that compiled a graph, minus a steady step each),
steady tokens/s over B_k * T_k (padded), and the time to train on the sequence's samples (steady steps).

    python benchmarks/bench_variable_shapes.py --model gpt2-small --out $OUT      # all modes, a table last
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODES = ["fixed non-DP", "fixed DP", "variable non-DP", "variable DP", "pad-to-max DP"]
# diagnostic modes (not in the default list): only B or only T varies
EXTRA_MODES = ["varyB non-DP", "varyT non-DP", "varyB DP", "varyT DP"]
T_MAX = 1024


def shape_sequence(steps: int, mean_batch: float = 8.0, seed: int = 0, multiple: int = 1) -> list:
    """[(B_k, T_k)]: Poisson batch sizes, each batch padded to its longest sample (T_k >= 2), rounded up to a
    multiple of `multiple` (a collator's pad_to_multiple_of)."""
    with open(os.path.join(HERE, "data", "shakespeare_passage_lengths.json")) as f:
        hist = json.load(f)["histogram"]
    lengths, weights = [int(k) for k in hist], list(hist.values())
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        # Poisson by inversion (no numpy needed)
        b, p, u = 0, math.exp(-mean_batch), rng.random()
        s = p
        while u > s:
            b += 1
            p *= mean_batch / b
            s += p
        t = max(rng.choices(lengths, weights, k=b)) if b else 2
        t = -(-t // multiple) * multiple
        out.append((b, max(2, min(t, T_MAX))))
    return out


def run_mode(model_name: str, mode: str, steps: int, multiple: int = 1, profile_at: int = 0,
             out: str | None = None) -> dict:
    import torch

    import dpcompile
    from model_zoo import build_model  # the harness's models (benchmarks/model_zoo.py)

    seq = shape_sequence(steps, multiple=multiple)
    if mode.startswith("fixed"):
        mean_b = 8
        mean_t = round(sum(t for b, t in seq if b) / sum(1 for b, _ in seq if b))
        seq = [(mean_b, mean_t)] * steps
    elif mode.startswith("pad-to-max"):
        seq = [(b, T_MAX) for b, _ in seq]
    elif mode.startswith("vary"):  # varyB: T fixed at the mean; varyT: B fixed at 8
        mean_t = round(sum(t for b, t in seq if b) / sum(1 for b, _ in seq if b))
        seq = [(b, mean_t) for b, _ in seq] if mode.startswith("varyB") else [(8, t) for _, t in seq]
    torch.manual_seed(0)
    model = build_model(model_name, T_MAX).cuda()
    for p in model.frozen():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.lm_head.out_features
    opt = torch.optim.AdamW(params, lr=1e-4)
    if mode.endswith("non-DP"):
        step_model = torch.compile(model)
    else:
        step_model = dpcompile.compile(model, max_grad_norm=1.0, clipping="per_layer", loss_reduction="mean")
        opt = dpcompile.DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8.0)
    from torch._dynamo.utils import counters

    times, compiled_steps = [], []
    prof = None
    for k, (b, t) in enumerate(seq):
        if profile_at and k == profile_at:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        idx = torch.randint(0, vocab, (b, t + 1), device="cuda")
        x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
        graphs = counters["stats"]["unique_graphs"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        if prof is None:  # profiled steps are slowed by the profiler: not counted
            (compiled_steps if counters["stats"]["unique_graphs"] > graphs else times).append((b, t, took))
        if prof is not None and k == profile_at + 2:  # three steps profiled
            prof.__exit__(None, None, None)
            _write_profile(prof, mode, seq[profile_at:k + 1], out)
            prof = None
    steady = sum(s for _, _, s in times)
    tokens = sum(b * t for b, t, _ in times)
    # the second half alone: per-new-shape costs (vendor heuristics, plans) fade as a run sees its shapes again
    late = times[len(times) // 2:]
    late_s = sum(s for _, _, s in late)
    per_token = steady / max(tokens, 1)
    # a compiling step also did a step's work: take that work off at the steady per-token cost
    compile_s = sum(s - b * t * per_token for b, t, s in compiled_steps)
    return {"model": model_name, "mode": mode, "steps": len(seq), "graphs": len(compiled_steps),
            "compile_s": compile_s, "first_step_s": (compiled_steps or times)[0][2],
            "tokens_per_s": tokens / steady if steady else float("nan"),
            "late_tokens_per_s": sum(b * t for b, t, _ in late) / late_s if late_s else float("nan"),
            "median_step_ms": 1e3 * statistics.median(s for _, _, s in times) if times else float("nan"),
            "train_s": steady + sum(b * t * per_token for b, t, _ in compiled_steps),
            "mean_B": statistics.mean(b for b, _ in seq), "mean_T": statistics.mean(t for _, t in seq),
            "pad_multiple": multiple, "step_ms": [round(1e3 * s, 1) for _, _, s in compiled_steps + times],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def _write_profile(prof, mode: str, shapes: list, out: str | None) -> None:
    """The profiled steps' top ops by self CPU time and by self device time, to stderr and $OUT."""
    ka = prof.key_averages()
    text = (f"== profile of {mode}, steps with (B, T) = {shapes}\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=30) + "\n"
            + ka.table(sort_by="self_device_time_total", row_limit=30))
    print(text, file=sys.stderr, flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"profile_{mode.replace(' ', '_')}.txt"), "w") as f:
            f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small", help="gpt2-small (default), gpt2-medium, llama-1b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="folder for the JSON lines of every mode")
    ap.add_argument("--pad-multiple", type=int, default=1, help="round each batch's T up to a multiple of this")
    ap.add_argument("--profile-at", type=int, default=0, help="profile steps N..N+2 of each mode (0: none)")
    ap.add_argument("--shared-cache", action="store_true",
                    help="one Inductor cache for all modes (compile times then are not cold)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.model, args.one, args.steps, args.pad_multiple, args.profile_at,
                                              args.out)), flush=True)
        return 0
    rows = []
    shared = tempfile.mkdtemp(prefix="dpcompile-vary-")
    for mode in args.modes.split(","):
        print(f"== {args.model} / {mode}", file=sys.stderr, flush=True)
        # a cold Inductor cache per mode: compile times are not shortened by an earlier mode's kernels
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=shared if args.shared_cache
                   else tempfile.mkdtemp(prefix="dpcompile-vary-"))
        p = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                            "--pad-multiple", str(args.pad_multiple), "--one", mode,
                            "--profile-at", str(args.profile_at)] + (["--out", args.out] if args.out else []),
                           capture_output=True, text=True, env=env)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(p.stderr[-4000:], file=sys.stderr)
            rows.append({"model": args.model, "mode": mode, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"variable_shapes_{args.model}_pad{args.pad_multiple}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    ref = {r["mode"]: r for r in rows if "error" not in r}
    print(f"| {args.model} | graphs | compile s | tokens/s | vs fixed DP | 2nd half tokens/s | vs fixed DP "
          "| train s (steady) | mean B x T |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error'][:80]} |||||")
            continue
        fixed = ref.get("fixed DP", {})
        vs = r["tokens_per_s"] / fixed.get("tokens_per_s", float("nan"))
        vs_late = r["late_tokens_per_s"] / fixed.get("late_tokens_per_s", float("nan"))
        print(f"| {r['mode']} | {r['graphs']} | {r['compile_s']:.1f} | {r['tokens_per_s']:.0f} | {vs:.3f} | "
              f"{r['late_tokens_per_s']:.0f} | {vs_late:.3f} | {r['train_s']:.2f} | "
              f"{r['mean_B']:.1f} x {r['mean_T']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
