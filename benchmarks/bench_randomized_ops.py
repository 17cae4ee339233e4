"""Per-op benchmark for randomized (probe) norms at long contexts: the Hutchinson estimate of one linear site with
k probes, IEEE fp32 FMAs in one row slice against tensor-core products at fp32 accuracy (exact bf16 products for
bf16 data) with split-T (the default), next to the non-DP weight gradient of the same site (one cuBLAS GEMM over
B*T rows), and the same estimate taken from the site's bf16 per-sample products (randomized_stored; forming them is
the clipped sum's GEMM, not counted). Also checks that the estimates agree. Prints a table; --out writes JSON.

    python benchmarks/bench_randomized_ops.py [--probes 32] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_linear_ops import bench as bench_eager  # noqa: E402
from dpcompile.codegen.kernels import randomized as K  # noqa: E402

SHAPES = [  # (label, B, T, M = d_in, N = d_out)
    ("gpt2-small qkv T=16384", 2, 16384, 768, 2304), ("gpt2-small proj T=16384", 2, 16384, 768, 768),
    ("gpt2-small fc T=16384", 2, 16384, 768, 3072), ("gpt2-small fc2 T=16384", 2, 16384, 3072, 768),
    ("gpt2-small lm_head T=16384", 2, 16384, 768, 50257),
    ("llama-1b q T=8192", 2, 8192, 2048, 2048), ("llama-1b k T=8192", 2, 8192, 2048, 256),
    ("llama-1b gate T=8192", 2, 8192, 2048, 5632), ("llama-1b down T=8192", 2, 8192, 5632, 2048),
    ("llama-1b lm_head T=8192", 2, 8192, 2048, 32000),
]


@functools.cache
def gpu_seed() -> torch.Tensor:
    """A one-element int64 seed on the GPU, as the compiled step passes it (codegen/randomized_ops.probe_seed): an
    int seed is copied from pageable memory on every call, which waits for the stream (NOTES.md entry 9)."""
    return torch.tensor([1], dtype=torch.int64, device="cuda")


def bench(fn, calls: int = 10) -> float:
    """Median GPU microseconds of one call of fn, replayed from a CUDA graph of `calls` calls: without the graph,
    a call of a few small kernels is timed at its Python launch cost (the GPU waits for the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator pools) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench_eager(graph.replay) / calls


def sweep_project(k: int, label: str, B: int, T: int, M: int) -> list:
    """The projection alone at one site over row tiles, column slices and warps, with drawn and loaded probes (the
    difference is what the draws cost). M is the side the probes are drawn for (the narrower one)."""
    a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
    seed = gpu_seed()
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
    out.append({"site": label, "kernel": "project (defaults, slices added)",
                "us": bench(lambda: K._project(a, seed, 0, 0, k, lambda f: f, None))})
    return out


#: how b^T z takes Z (_bt_z_kernel's SPLIT_Z)
Z_MODES = {False: "in kernel", True: "pre-split"}
#: b^T z tilings the sweep tries: (BLOCK_T, BLOCK_N, warps); stages 3 and 4 each
BT_Z_TILES = ((64, 128, 4), (64, 128, 8), (128, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4))


def sweep_bt_z(k: int, label: str, B: int, T: int, M: int, N: int) -> list:
    """b^T z alone at one site (N the wide side) over tiles, warps, pipeline stages and row slices around the split
    rule's choice, with Z split into bf16 terms by every program ("in kernel", the kernel of entry 6) or once
    beforehand ("pre-split", _split3; one wide dot over the three terms was tried in run 20 and was no faster);
    then the defaults end to end (split, product, tile squares)."""
    a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
    seed = gpu_seed()
    z = torch.randn(B, T, k, device="cuda")
    out = []
    for mode, name in Z_MODES.items():
        zz = K._split3(z.unsqueeze(0), lambda f: f) if mode else z.unsqueeze(0)
        for bt, bn, warps in BT_Z_TILES:
            tiles = K._cdiv(N, bn)
            rule = K._splits(B, T, tiles, bt, None)
            for stages in (3, 4):
                for nsplit in sorted({max(1, rule // 2), rule, min(rule * 2, K._cdiv(T, bt))}):
                    rows = K._cdiv(K._cdiv(T, nsplit), bt) * bt
                    part = torch.empty(B, nsplit, N, k, device="cuda")
                    row = {"site": label, "kernel": "bt_z", "z": name, "splits": nsplit, "BLOCK_T": bt,
                           "BLOCK_N": bn, "warps": warps, "stages": stages, "programs": B * tiles * nsplit}
                    try:
                        row["us"] = bench(lambda: K._bt_z_kernel[(B, tiles, nsplit)](
                            b, zz, part, T, N, k, rows, *b.stride(), *zz.stride(), *part.stride(), 1, tiles,
                            PRECISION="bf16x3", SQUARES=False, SPLIT_Z=mode, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=32,
                            num_warps=warps, num_stages=stages))
                    except Exception as e:  # a tiling over the shared memory (or registers) of this GPU
                        print(f"{label} {name} {bt}x{bn} {warps} warps {stages} stages: {type(e).__name__}",
                              flush=True)
                        continue
                    out.append(row)
                    _print_rows([row])
    tq = K._bt_z_launch(b, z, lambda f: f, None, "tensor_cores", None, squares=False)
    for rows_sq in (16, 32, 128):
        sq_tiles = K._cdiv(N, rows_sq)
        sq = torch.empty(B, sq_tiles, device="cuda")
        out.append({"site": label, "kernel": f"tile squares of {tq.shape[1]} slices, {rows_sq}-row tiles",
                    "us": bench(lambda: K._tile_sq_kernel[(B, sq_tiles)](
                        tq, sq, N, k, tq.shape[1], *tq.stride(), 1, sq_tiles, BLOCK_N=rows_sq, BLOCK_K=32))})
    parts = K._project_parts(a, seed, 0, 0, k, lambda f: f, None)
    out.append({"site": label, "kernel": f"split3 of {parts.shape[0]} projection slices",
                "us": bench(lambda: K._split3(parts, lambda f: f))})
    out.append({"site": label, "kernel": "split3 + bt_z + tile squares (defaults)",
                "us": bench(lambda: K._bt_z_sq_norms(b, parts, lambda f: f, None))})
    out.append({"site": label, "kernel": "whole estimate (defaults)",
                "us": bench(lambda: K.randomized_sq_norms(a, b, k, seed=seed))})
    out.append({"site": label, "kernel": "read b once (b.sum())", "us": bench(lambda: b.sum())})
    return out


def _print_rows(rows):
    for r in rows:
        print(" ".join(f"{n}={v}" if not isinstance(v, float) else f"{n}={v:.0f}" for n, v in r.items()), flush=True)


#: sites for --sweep: (label, B, T, narrow side, wide side)
SWEEP_SHAPES = [("gpt2-small 768-wide side T=16384", 2, 16384, 768, 3072),
                ("llama-1b 2048-wide side T=16384", 2, 16384, 2048, 5632),
                ("llama-1b k/v (256) T=16384", 2, 16384, 256, 2048)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--sweep", nargs="?", const="all", choices=("all", "project", "bt_z"), default=None,
                    help="time each kernel (or only the one named) alone over tile shapes, then stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.probes
    if args.sweep:
        rows = []
        for label, B, T, M, N in SWEEP_SHAPES:
            if args.sweep in ("all", "project"):
                rows += sweep_project(k, label, B, T, M)
                _print_rows([r for r in rows if r["site"] == label and r["kernel"].startswith("project")])
            if args.sweep in ("all", "bt_z"):
                rows += sweep_bt_z(k, label, B, T, M, N)
                _print_rows([r for r in rows if r["site"] == label and r["kernel"] != "bt_z"
                             and not r["kernel"].startswith("project")])
        print("\n| site | kernel | fastest (tiling) | us | at the defaults |")
        print("|---|---|---|---|---|")
        for label, B, T, _, N in SWEEP_SHAPES:
            for draw in (True, False):
                cand = [r for r in rows if r["site"] == label and r["kernel"] == "project" and r["draw"] is draw]
                if cand:
                    best = min(cand, key=lambda r: r["us"])
                    dflt = [r for r in cand if (r["BLOCK_T"], r["warps"]) == (K._PROJECT_ROWS, K._PROJECT_WARPS)]
                    print(f"| {label} | project, {'drawn' if draw else 'loaded'} (BLOCK_T, col_splits, warps) | "
                          f"{best['BLOCK_T']}, {best['col_splits']}, {best['warps']} | {best['us']:.0f} | "
                          f"{min(r['us'] for r in dflt):.0f} (best slices) |")
            for pre in Z_MODES.values():
                cand = [r for r in rows if r["site"] == label and r["kernel"] == "bt_z" and r["z"] == pre]
                if cand:
                    best = min(cand, key=lambda r: r["us"])
                    rule = K._splits(B, T, K._cdiv(N, 128), 64, None)
                    dflt = [r for r in cand if (r["BLOCK_T"], r["BLOCK_N"], r["warps"], r["stages"], r["splits"])
                            == (64, 128, 4, 3, rule)]
                    print(f"| {label} | b^T z, Z split {pre} (BLOCK_T, BLOCK_N, warps, stages, row slices) | "
                          f"{best['BLOCK_T']}, {best['BLOCK_N']}, {best['warps']}, {best['stages']}, "
                          f"{best['splits']} | {best['us']:.0f} | {dflt[0]['us'] if dflt else float('nan'):.0f} |")
            for r in rows:
                if r["site"] == label and r["kernel"] not in ("project", "bt_z"):
                    print(f"| {label} | {r['kernel']} | | {r['us']:.0f} | |")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "randomized_sweep.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows, seed = [], gpu_seed()
    for label, B, T, M, N in SHAPES:
        a = torch.randn(B, T, M, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16)
        r = {"shape": label, "B": B, "T": T, "M": M, "N": N, "probes": k}
        r["wgrad_us"] = bench(lambda: a.reshape(-1, M).t() @ b.reshape(-1, N))
        r["ieee_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=seed, precision="ieee", splits=1))
        r["tc_one_slice_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=seed, splits=1))
        r["tc_us"] = bench(lambda: K.randomized_sq_norms(a, b, k, seed=seed))
        ieee = K.randomized_sq_norms(a, b, k, seed=seed, precision="ieee", splits=1)
        fast = K.randomized_sq_norms(a, b, k, seed=seed)
        r["max_rel_diff"] = ((fast - ieee).abs() / ieee).max().item()
        # randomized_stored: the same estimate from the per-sample products (formed by the clipped sum's GEMM)
        s = torch.bmm(a.transpose(1, 2), b)
        r["products_us"] = bench(lambda: K.randomized_sq_norms_of_products(s, k, seed=seed))
        from_products = K.randomized_sq_norms_of_products(s, k, seed=seed)
        r["products_rel_diff"] = ((from_products - ieee).abs() / ieee).max().item()
        del s
        flop = 2 * B * T * k * (M + N)
        r["ieee_tflops"] = flop / r["ieee_us"] / 1e6
        r["tc_tflops"] = flop / r["tc_us"] / 1e6
        r["ieee_x_wgrad"] = r["ieee_us"] / r["wgrad_us"]
        r["tc_x_wgrad"] = r["tc_us"] / r["wgrad_us"]
        rows.append(r)
        print(f"{label}: " + ", ".join(f"{n}={v:.3g}" for n, v in r.items() if isinstance(v, float)), flush=True)
    print(f"\n| site (k={k}) | wgrad us | ieee us (TF/s) | tensor cores one slice us "
          "| tensor cores split-T us (TF/s) | ieee / wgrad | tensor cores / wgrad | max rel diff "
          "| from bf16 products us (rel diff) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['wgrad_us']:.0f} | {r['ieee_us']:.0f} ({r['ieee_tflops']:.0f}) | "
              f"{r['tc_one_slice_us']:.0f} | {r['tc_us']:.0f} ({r['tc_tflops']:.0f}) | "
              f"{r['ieee_x_wgrad']:.2f} | {r['tc_x_wgrad']:.2f} | {r['max_rel_diff']:.1e} | "
              f"{r['products_us']:.0f} ({r['products_rel_diff']:.1e}) |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "randomized_ops.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
