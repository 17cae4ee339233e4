"""Per-op benchmark for randomized (probe) norms at long contexts: the Hutchinson estimate of one linear site with
k probes, IEEE fp32 FMAs in one row slice against tensor-core products at fp32 accuracy (exact bf16 products for
bf16 data) with split-T (the default), next to the non-DP weight gradient of the same site (one cuBLAS GEMM over
B*T rows). Also checks that the two precisions agree. Prints a table; --out writes JSON.

    python benchmarks/bench_randomized_ops.py [--probes 32] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_linear_ops import bench  # noqa: E402
from dpcompile.codegen.kernels import randomized as K  # noqa: E402

SHAPES = [  # (label, B, T, M = d_in, N = d_out)
    ("gpt2-small qkv T=16384", 2, 16384, 768, 2304), ("gpt2-small proj T=16384", 2, 16384, 768, 768),
    ("gpt2-small fc T=16384", 2, 16384, 768, 3072), ("gpt2-small fc2 T=16384", 2, 16384, 3072, 768),
    ("gpt2-small lm_head T=16384", 2, 16384, 768, 50257),
    ("llama-1b q T=8192", 2, 8192, 2048, 2048), ("llama-1b k T=8192", 2, 8192, 2048, 256),
    ("llama-1b gate T=8192", 2, 8192, 2048, 5632), ("llama-1b down T=8192", 2, 8192, 5632, 2048),
    ("llama-1b lm_head T=8192", 2, 8192, 2048, 32000),
]


def sweep(k: int, label: str, B: int, T: int, M: int, N: int) -> list:
    """Each kernel alone at one site, over tile shapes and warps: where the time goes (probe draws, loads, dots)."""
    a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([1], device="cuda")
    v = torch.randn(B, M, k, device="cuda")
    z = torch.empty(B, T, k, device="cuda")
    out = []
    for draw in (True, False):
        for bt, bm, warps in ((64, 32, 4), (128, 32, 4), (128, 64, 4), (128, 64, 8), (256, 32, 8), (256, 64, 8)):
            grid = (B, K._cdiv(T, bt), K._cdiv(k, 32))
            us = bench(lambda: K._project_kernel[grid](
                a, v, seed, z, 0, 0, T, M, k, *a.stride(), *v.stride(), *z.stride(), DRAW=draw,
                PRECISION="bf16x3", BLOCK_T=bt, BLOCK_M=bm, BLOCK_K=32, num_warps=warps))
            out.append({"site": label, "kernel": "project", "draw": draw, "BLOCK_T": bt, "BLOCK_M": bm,
                        "warps": warps, "us": us})
    for splits in (1, 4, 16, 32):
        for bt, bn, warps in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (64, 128, 8)):
            tiles = K._cdiv(N, bn)
            nsplit = max(1, min(splits, K._cdiv(T, bt)))
            rows = K._cdiv(K._cdiv(T, nsplit), bt) * bt
            part = torch.empty(B, nsplit, N, k, device="cuda")
            us = bench(lambda: K._bt_z_kernel[(B, tiles, nsplit)](
                b, z, part, T, N, k, rows, *b.stride(), *z.stride(), *part.stride(), 1, PRECISION="bf16x3",
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=32, num_warps=warps))
            out.append({"site": label, "kernel": "bt_z", "splits": nsplit, "BLOCK_T": bt, "BLOCK_N": bn,
                        "warps": warps, "us": us})
    out.append({"site": label, "kernel": "bt_z + tile squares (default tiling)",
                "us": bench(lambda: K._bt_z_sq_norms(b, z, lambda f: f, None))})
    for r in out:
        print(" ".join(f"{n}={v}" if not isinstance(v, float) else f"{n}={v:.0f}" for n, v in r.items()), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--sweep", action="store_true", help="time each kernel alone over tile shapes, then stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.probes
    if args.sweep:
        rows = sweep(k, *SHAPES[0]) + sweep(k, *SHAPES[3])
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "randomized_sweep.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for label, B, T, M, N in SHAPES:
        a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
        r = {"shape": label, "B": B, "T": T, "M": M, "N": N, "probes": k}
        r["wgrad_us"] = bench(lambda: a.reshape(-1, M).t() @ b.reshape(-1, N))
        r["ieee_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=1, precision="ieee", splits=1))
        r["tc_one_slice_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=1, splits=1))
        r["tc_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=1))
        ieee = K.randomized_sq_norms(a, b, k, seed=1, precision="ieee", splits=1)
        fast = K.randomized_sq_norms(a, b, k, seed=1)
        r["max_rel_diff"] = ((fast - ieee).abs() / ieee).max().item()
        flop = 2 * B * T * k * (M + N)
        r["ieee_tflops"] = flop / r["ieee_us"] / 1e6
        r["tc_tflops"] = flop / r["tc_us"] / 1e6
        r["ieee_x_wgrad"] = r["ieee_us"] / r["wgrad_us"]
        r["tc_x_wgrad"] = r["tc_us"] / r["wgrad_us"]
        rows.append(r)
        print(f"{label}: " + ", ".join(f"{n}={v:.3g}" for n, v in r.items() if isinstance(v, float)), flush=True)
    print(f"\n| site (k={k}) | wgrad us | ieee us (TF/s) | tensor cores one slice us "
          "| tensor cores split-T us (TF/s) | ieee / wgrad | tensor cores / wgrad | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['wgrad_us']:.0f} | {r['ieee_us']:.0f} ({r['ieee_tflops']:.0f}) | "
              f"{r['tc_one_slice_us']:.0f} | {r['tc_us']:.0f} ({r['tc_tflops']:.0f}) | "
              f"{r['ieee_x_wgrad']:.2f} | {r['tc_x_wgrad']:.2f} | {r['max_rel_diff']:.1e} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "randomized_ops.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
