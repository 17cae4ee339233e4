"""Per-op benchmark for linear weight sites: each strategy's norm + clipped sum against the non-DP weight gradient
(one cuBLAS GEMM over B*T rows), on the shapes of the harness' workloads. Prints a table; --out writes JSON.
Also reports the achieved TFLOP/s of each kernel, which is what plan.DeviceModel's rates should be.

    python benchmarks/bench_linear_ops.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpcompile.codegen import ops  # noqa: E402
from dpcompile.codegen.kernels import linear as K  # noqa: E402

SHAPES = [  # (label, B, T, M = d_in, N = d_out)
    ("gpt2-small qkv", 8, 1024, 768, 2304), ("gpt2-small fc2", 8, 1024, 3072, 768),
    ("gpt2-small lm_head", 8, 1024, 768, 50304), ("gpt2-large fc", 8, 1024, 1280, 5120),
    ("gpt2-small qkv T=4096", 2, 4096, 768, 2304), ("llama-1b gate", 4, 2048, 2048, 5632),
    ("llama-1b k", 4, 2048, 2048, 256), ("short T=128 4096^2", 8, 128, 4096, 4096),
]


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e3  # microseconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for label, B, T, M, N in SHAPES:
        a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
        coef = torch.rand(B, device="cuda")
        rest = torch.zeros(B, device="cuda")
        flop = 2 * B * T * M * N
        r = {"shape": label, "B": B, "T": T, "M": M, "N": N}
        r["wgrad_us"] = bench(lambda: a.reshape(-1, M).t() @ b.reshape(-1, N))
        r["direct_norm_us"] = bench(lambda: K.per_sample_sq_norms(a, b))
        r["ghost_norm_us"] = bench(lambda: K.ghost_sq_norms(a, b))
        r["clipped_sum_us"] = bench(lambda: K.clipped_sum(a, b, coef))
        r["single_pass_us"] = bench(lambda: ops.linear_single_pass(a, b, rest, 1.0, 1.0, "abadi", True))
        r["two_pass_us"] = bench(lambda: (ops.linear_tile_norm(a, b), ops.linear_tile_clipped_sum(a, b, coef)))
        r["triton_tiles_us"] = bench(lambda: K.per_sample_tiles(a, b))  # the Triton tile GEMM bmm replaced
        r["bmm_us"] = bench(lambda: torch.bmm(a.transpose(1, 2), b))
        r["wgrad_tflops"] = flop / r["wgrad_us"] / 1e6
        r["direct_norm_tflops"] = flop / r["direct_norm_us"] / 1e6
        r["clipped_sum_tflops"] = flop / r["clipped_sum_us"] / 1e6
        r["ghost_norm_tflops"] = 2 * B * T * T * (M + N) / 2 / r["ghost_norm_us"] / 1e6
        r["direct_x"] = (r["direct_norm_us"] + r["clipped_sum_us"]) / r["wgrad_us"]
        r["ghost_x"] = (r["ghost_norm_us"] + r["clipped_sum_us"]) / r["wgrad_us"]
        r["single_x"] = r["single_pass_us"] / r["wgrad_us"]
        r["two_pass_x"] = r["two_pass_us"] / r["wgrad_us"]
        rows.append(r)
        print(f"{label}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    print("\n| shape | wgrad us (TF/s) | direct x | ghost x | single_pass x | two_pass x | bmm us | Triton tiles us "
          "| norm TF/s | sum TF/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['wgrad_us']:.0f} ({r['wgrad_tflops']:.0f}) | {r['direct_x']:.2f} | "
              f"{r['ghost_x']:.2f} | {r['single_x']:.2f} | {r['two_pass_x']:.2f} | {r['bmm_us']:.0f} | "
              f"{r['triton_tiles_us']:.0f} | {r['direct_norm_tflops']:.0f} | {r['clipped_sum_tflops']:.0f} |")
    if args.out:
        with open(os.path.join(args.out, "linear_ops.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
