"""Why a DP graph recompiles when B and T change (issue 19): a 2-layer GPT on the benchmark's first shapes, with
Dynamo's recompile reasons printed, under each SDPA choice policy.

    python benchmarks/diag_recompiles.py [--steps 8]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def run(policy: str, steps: int) -> None:
    import torch
    import dpcompile
    import dpcompile.backend as backend
    from bench_variable_shapes import shape_sequence
    from model_zoo import GPT
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    import dpcompile.passes.driver as driver
    original = driver.run_dp_pass

    def run_dp_pass(graph, ctx):  # which attention kernel the joint graph holds, and the symbols it sees
        attn = sorted({str(n.target) for n in graph.nodes if "attention" in str(n.target)})
        print(f"[{policy}] joint graph attention ops: {attn}", flush=True)
        return original(graph, ctx)
    driver.run_dp_pass = run_dp_pass
    if policy == "pytorch order":
        backend.attention_for = lambda gm: contextlib.nullcontext()
    torch.manual_seed(0)
    model = GPT(2, 256, 4, 1024, vocab=4096).cuda()
    for p in model.frozen():
        p.requires_grad_(False)
    step = dpcompile.compile(model, max_grad_norm=1.0, clipping="per_layer", loss_reduction="mean")
    g0 = counters["stats"]["unique_graphs"]
    for b, t in shape_sequence(steps):
        idx = torch.randint(0, 4096, (b, t + 1), device="cuda")
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(idx[:, :-1], idx[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"[{policy}] B={b} T={t} graphs={counters['stats']['unique_graphs'] - g0} "
              f"{1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--policy", default="dpcompile,pytorch order")
    args = ap.parse_args()
    import torch
    torch._logging.set_logs(recompiles=True)
    for policy in args.policy.split(","):
        run(policy, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
