"""The single-pass / stored clipped sum's reduction, sum_s coef_s x_s over stored per-sample products (B, M, N) in
bf16 into fp32 (kernels/linear.py `scaled_reduce_`), on the shapes of gpt2-small B=8 T=1024 and the Llama-style
model: microseconds and achieved GB/s (bytes read and written over the time) for tile shapes around the package's
(REDUCE_BLOCK, REDUCE_SAMPLES, REDUCE_WARPS), BLOCK_S = 1 being the one-row-at-a-time loop it replaced (NOTES 35).
The package's config is marked with *; the table prints last.

    python benchmarks/bench_scaled_reduce.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpcompile.codegen.kernels import linear as K  # noqa: E402

SHAPES = [  # (label, samples, M, N): the LM head's chunk is the 256 MB budget's 3 samples
    ("gpt2-small qkv", 8, 768, 2304), ("gpt2-small proj", 8, 768, 768), ("gpt2-small fc", 8, 768, 3072),
    ("gpt2-small lm_head chunk", 3, 768, 50304), ("llama-1b gate", 4, 2048, 5632),
]
CONFIGS = [(1024, 1, 4), (1024, 4, 4), (1024, 8, 4), (2048, 8, 8), (1024, 8, 8), (512, 8, 4), (1024, 16, 8)]


def bench(fn, reps=20, calls=20):
    """GPU microseconds a call: `calls` launches captured in a CUDA graph and replayed, so that the host's launch
    time (~20 us a Triton launch, more than these kernels take) is not what the events measure."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    package = (K.REDUCE_BLOCK, K.REDUCE_SAMPLES, K.REDUCE_WARPS)
    rows = []
    for label, S, M, N in SHAPES:
        x = torch.randn(S, M, N, device="cuda", dtype=torch.bfloat16)
        coef = torch.rand(S, device="cuda")
        want = torch.einsum("s,smn->mn", coef.double(), x.double())
        nbytes = S * M * N * 2 + M * N * 4
        for block, block_s, warps in CONFIGS:
            acc = torch.empty(M, N, device="cuda")

            def run():
                K._scaled_reduce_kernel[(triton.cdiv(M * N, block),)](x, coef, acc, S, M * N, ACCUMULATE=False,
                                                                      BLOCK=block, BLOCK_S=block_s, num_warps=warps)
            us = bench(run)
            err = (acc.double() - want).abs().max().item()
            rows.append({"shape": label, "S": S, "M": M, "N": N, "block": block, "block_s": block_s, "warps": warps,
                         "us": us, "gbps": nbytes / us / 1e3, "max_err": err,
                         "package": (block, block_s, warps) == package})
            print(f"{label} {block}x{block_s} w{warps}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s, err {err:.1e}",
                  flush=True)
        rows.append({"shape": label, "S": S, "M": M, "N": N, "block": "einsum", "us": bench(
            lambda: torch.einsum("s,smn->mn", coef, x.float())), "package": False})
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | " + " | ".join(f"{b}x{s} w{w}{'*' if (b, s, w) == package else ''}" for b, s, w in CONFIGS)
          + " | einsum (fp32) |")
    print("|---" * (len(CONFIGS) + 2) + "|")
    for label, *_ in SHAPES:
        mine = [r for r in rows if r["shape"] == label]
        cells = [f"{r['us']:.0f} us {r['gbps']:.0f} GB/s" for r in mine if r["block"] != "einsum"]
        print(f"| {label} | " + " | ".join(cells) + f" | {mine[-1]['us']:.0f} us |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
