"""One training step, timed: non-DP torch.compile (baseline) vs flashdp, on one GPU, in one process per mode.

    python benchmarks/bench_step.py                       # gpt2-small B=8 T=1024 bf16 autocast, all modes
    python benchmarks/bench_step.py --out $OUT            # also writes results.json / RESULTS.md rows there

Workload as in ../shared/bench/peer_results.md: GPT-2-shaped plain PyTorch model (frozen token/position embeddings,
LayerNorm, fused qkv, SDPA causal attention, untied 50304-wide lm_head trained), AdamW, mean cross-entropy over
per-sample token means, median of 8 timed steps after 3 warm-up steps, peak = torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer, d, h, T, vocab=50304):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x)).float()
        tok = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return tok.view(targets.shape).mean(1).mean()


def run_mode(mode: str, size: str, B: int, T: int, profile: bool = False) -> dict:
    torch.manual_seed(0)
    if mode.endswith("+cudagraphs"):  # experiment: Inductor's CUDA graphs, to see how launch-bound a mode is
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraphs = True
        mode = mode[: -len("+cudagraphs")]
    model = GPT(*SIZES[size], T).cuda()
    model.wte.weight.requires_grad_(False)
    model.wpe.weight.requires_grad_(False)
    if mode == "non-DP compiled":
        step_model = torch.compile(model)
    elif mode == "non-DP eager":
        step_model = model
    else:
        import dpcompile
        step_model = dpcompile.compile(model, max_grad_norm=1.0, clipping=mode.split()[1], loss_reduction="mean")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, 50304, (B, T + 1), device="cuda")
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(11):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    result = {"tokens_per_s": B * T / statistics.median(times),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if profile:  # one more step under the profiler: the kernels that take the time, to stderr
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
        print(f"== {mode}\n" + p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60),
              file=sys.stderr)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--modes", default="non-DP compiled,non-DP eager,flashdp per_layer,flashdp flat")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print each mode's top CUDA kernels")
    args = ap.parse_args()
    if args.one:  # child process: one mode
        print(json.dumps(run_mode(args.one, args.size, args.B, args.T, args.profile)))
        return
    import triton
    workload = f"gpt2-{args.size} B={args.B} T={args.T}"
    rows = []
    for mode in args.modes.split(","):
        print(f"[{workload}] {mode} ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--one", mode, "--size", args.size, "--B", str(args.B),
                            "--T", str(args.T)] + (["--profile"] if args.profile else []),
                           capture_output=True, text=True)
        if args.profile:
            print(p.stderr[-6000:], flush=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], flush=True)
            rows.append({"workload": workload, "mode": mode, "error": p.stderr.strip().splitlines()[-1][:300]})
            continue
        rows.append({"workload": workload, "mode": mode, **json.loads(p.stdout.strip().splitlines()[-1])})
    base = next((r for r in rows if r["mode"] == "non-DP compiled" and "tokens_per_s" in r), None)
    meta = {"gpus": 1, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}
    for r in rows:
        if base and "tokens_per_s" in r:
            r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_mem_gib"] / base["peak_mem_gib"]
        r.update(meta)
    print(f"\n{meta}\n| workload | mode | tok/s | vs non-DP compiled | peak GiB | mem ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"| {r['workload']} | {r['mode']} | {r['tokens_per_s']/1e3:.1f}k | {r['throughput_ratio']:.2f} | "
                  f"{r['peak_mem_gib']:.2f} | {r['memory_ratio']:.2f} |")
        else:
            print(f"| {r['workload']} | {r['mode']} | failed: {r['error']} | | | |")
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
