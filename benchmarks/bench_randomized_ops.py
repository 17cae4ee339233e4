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
    """Each kernel alone at one site: the projection over row tiles, column slices and warps (drawn and loaded
    probes: what the draws cost), b^T z over tiles, warps and row slices around the split rule's choice. M is the
    side the probes are drawn for (the narrower one), N the other."""
    a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([1], device="cuda")
    v = torch.randn(B, M, k, device="cuda")
    out = []
    for draw in (True, False):
        for bt, warps in ((128, 4), (128, 8), (256, 4), (256, 8), (512, 8)):
            for nsplit in (1, 2, 4, 8):
                cols = K._cdiv(K._cdiv(M, 64), nsplit) * 64
                ns = K._cdiv(M, cols)
                z = torch.empty(ns, B, T, k, device="cuda")
                grid = (B, K._cdiv(T, bt), K._cdiv(k, 32) * ns)
                us = bench(lambda: K._project_kernel[grid](
                    a, v, seed, z, 0, 0, T, M, k, cols, ns, *a.stride(), *v.stride(), *z.stride(), DRAW=draw,
                    PRECISION="bf16x3", BLOCK_T=bt, BLOCK_M=64, BLOCK_K=32, num_warps=warps))
                out.append({"site": label, "kernel": "project", "draw": draw, "BLOCK_T": bt, "col_splits": ns,
                            "warps": warps, "programs": grid[0] * grid[1] * grid[2], "us": us})
    z = torch.randn(B, T, k, device="cuda")
    tiles_default = K._cdiv(N, 128)
    for bt, bn, warps in ((64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 256, 8), (128, 64, 4)):
        tiles = K._cdiv(N, bn)
        rule = K._splits(B, T, tiles, bt, None)
        for nsplit in sorted({max(1, rule // 2), rule, min(rule * 2, K._cdiv(T, bt))}):
            rows = K._cdiv(K._cdiv(T, nsplit), bt) * bt
            part = torch.empty(B, nsplit, N, k, device="cuda")
            us = bench(lambda: K._bt_z_kernel[(B, tiles, nsplit)](
                b, z, part, T, N, k, rows, *b.stride(), *z.stride(), *part.stride(), 1, tiles, PRECISION="bf16x3",
                SQUARES=False, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=32, num_warps=warps))
            out.append({"site": label, "kernel": "bt_z", "splits": nsplit, "BLOCK_T": bt, "BLOCK_N": bn,
                        "warps": warps, "programs": B * tiles * nsplit, "us": us})
    out.append({"site": label, "kernel": f"bt_z rule at the defaults (64, 128, 4 warps): {tiles_default} tiles",
                "us": next(r["us"] for r in out if r.get("kernel") == "bt_z" and (r["BLOCK_T"], r["BLOCK_N"],
                           r["warps"], r["splits"]) == (64, 128, 4, K._splits(B, T, tiles_default, 64, None)))})
    out.append({"site": label, "kernel": "project (defaults, slices added)",
                "us": bench(lambda: K._project(a, seed, 0, 0, k, lambda f: f, None))})
    z = K._project(a, seed, 0, 0, k, lambda f: f, None)
    out.append({"site": label, "kernel": "bt_z + tile squares (defaults)",
                "us": bench(lambda: K._bt_z_sq_norms(b, z, lambda f: f, None))})
    for r in out:
        print(" ".join(f"{n}={v}" if not isinstance(v, float) else f"{n}={v:.0f}" for n, v in r.items()), flush=True)
    return out


#: sites for --sweep: (label, B, T, narrow side, wide side)
SWEEP_SHAPES = [("gpt2-small 768-wide side T=16384", 2, 16384, 768, 3072),
                ("llama-1b 2048-wide side T=16384", 2, 16384, 2048, 5632),
                ("llama-1b k/v (256) T=16384", 2, 16384, 256, 2048)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--sweep", action="store_true", help="time each kernel alone over tile shapes, then stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.probes
    if args.sweep:
        rows = [r for shape in SWEEP_SHAPES for r in sweep(k, *shape)]
        print("\n| site | probes | fastest projection (BLOCK_T, col_splits, warps) | us | at 128 rows, 1 slice, 4 warps |")
        print("|---|---|---|---|---|")
        for label, *_ in SWEEP_SHAPES:
            for draw in (True, False):
                cand = [r for r in rows if r["site"] == label and r["kernel"] == "project" and r["draw"] is draw]
                best = min(cand, key=lambda r: r["us"])
                old = next(r for r in cand if (r["BLOCK_T"], r["col_splits"], r["warps"]) == (128, 1, 4))
                print(f"| {label} | {'drawn' if draw else 'loaded'} | {best['BLOCK_T']}, {best['col_splits']}, "
                      f"{best['warps']} | {best['us']:.0f} | {old['us']:.0f} |")
            bt_z = [r for r in rows if r["site"] == label and r["kernel"] == "bt_z"]
            best = min(bt_z, key=lambda r: r["us"])
            print(f"| {label} | b^T z: fastest (BLOCK_T, BLOCK_N, warps, row slices) | {best['BLOCK_T']}, "
                  f"{best['BLOCK_N']}, {best['warps']}, {best['splits']} | {best['us']:.0f} | |")
            for r in rows:
                if r["site"] == label and r["kernel"] not in ("project", "bt_z"):
                    print(f"| {label} | {r['kernel']} | | {r['us']:.0f} | |")
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
