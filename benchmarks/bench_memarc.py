"""DP-MemArc benchmark: peak memory and tokens/s of DP full fine-tuning, DP-LoRA, DP side network and DP reversible
network (dpcompile.memarc, flashdp backend), on one GPU, one process per mode.

    python benchmarks/bench_memarc.py --out $OUT          # gpt2-large and llama-1b, B=8, T=1024, bf16 autocast
    python benchmarks/bench_memarc.py --parallel 4 --workloads llama-1b   # 4 modes compile at once, timed in turn
    python benchmarks/bench_memarc.py --small             # CPU smoke test: tiny configs, flashdp_eager, B=2, T=32

Workloads (random init: speed and memory only; utility is examples/memarc_finetune.py):
  gpt2-large  transformers GPT2LMHeadModel, n_layer=36, n_embd=1280, n_head=20, vocab 50257 (tied head), 774M
  llama-1b    transformers LlamaForCausalLM, hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 5632,
              vocab 32000, untied head, 0.85B
Modes (every DP mode: clipping per_layer, C=1, DPOptimizer(AdamW) with sigma=1, loss = mean over samples of each
sample's token mean, all parameters fp32 with bf16 autocast, attention "sdpa"):
  dp-full      every parameter but the token/position embeddings (GPT-2's tied head stays frozen with them)
  dp-lora      LoRA rank 8, alpha 16, on every attention projection
  dp-side      ladder side network, reduction 8, every layer tapped
  dp-rev       reversible adapter couplings (bottleneck 64) after every layer, frozen layers recomputed
Extra modes (--modes): nondp-full (torch.compile, AdamW, no DP), dp-rev-flat (flat clipping, accept_flat_cost),
dp-adapters (bottleneck 64 after attention and MLP), dp-side-flat.

tokens/s: B*T / median step time over --steps timed steps after --warmup steps (step = forward, backward, optimizer
step, zero_grad). Peak: torch.cuda.max_memory_allocated over the whole run, model included; saved_act_gib: what
the compiled graph keeps for backward (saved tensors that are not parameters, one more step). throughput_ratio and
memory_ratio are against dp-full of the same workload in the same run. A time budget (--budget-s, default 550 s)
keeps one call under 10 minutes: modes that no longer fit are reported as skipped (run them with --workloads/--modes).
Records are appended to benchmarks/results.json (with --out, the updated file is also written to $OUT/results.json);
the table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DEFAULT_MODES = "dp-full,dp-side,dp-rev,dp-lora"
WORKLOADS = ("gpt2-large", "llama-1b")


def build_lm(workload: str, small: bool, T: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if workload == "gpt2-large":
        size = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256) if small else \
            dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257)
        cfg = GPT2Config(n_positions=T if small else max(T, 1024), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                         summary_first_dropout=0.0, attn_implementation="sdpa", **size)
        cls = GPT2LMHeadModel
    elif workload == "llama-1b":
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=256) if small else \
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000)
        cfg = LlamaConfig(max_position_embeddings=T if small else max(T, 1024), attention_dropout=0.0,
                          tie_word_embeddings=False, attn_implementation="sdpa", **size)
        cls = LlamaForCausalLM
    else:
        raise SystemExit(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    return cls(cfg)


def make_model(mode: str, lm, small: bool):
    from dpcompile import memarc

    method, _, variant = mode.partition("-")[2].partition("-")
    kw = {"full": {}, "lora": dict(rank=8, alpha=16.0, targets="attn"), "adapters": dict(bottleneck=64),
          "side": dict(reduction=8), "rev": dict(bottleneck=64)}
    if small:
        kw.update(adapters=dict(bottleneck=8), side=dict(reduction=4), rev=dict(bottleneck=8))
    if method not in kw:
        raise SystemExit(f"unknown mode {mode!r}")
    fn = {"rev": memarc.reversible, "side": memarc.side_network}.get(method) or memarc.METHODS[method]
    model = fn(lm, copy_model=False, **kw[method])
    return model, ("flat" if variant == "flat" else "per_layer")


def run_mode(workload: str, mode: str, B: int, T: int, steps: int, warmup: int, small: bool, backend: str,
             gated: bool = False) -> dict:
    """gated: once warm, print READY and wait for GO on stdin (the harness's handshake: modes compile together,
    are timed one at a time)."""
    import torch

    import dpcompile
    from dpcompile import memarc

    torch.manual_seed(0)
    device = "cpu" if small else "cuda"
    lm = build_lm(workload, small, T).to(device)
    model, clipping = make_model(mode.replace("nondp-", "dp-"), lm, small)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(trainable, lr=1e-4)
    if mode.startswith("nondp"):
        step_model, opt = torch.compile(model), adam
    else:
        step_model = memarc.compile(model, clipping=clipping, max_grad_norm=1.0, loss_reduction="mean",
                                    accept_flat_cost=(clipping == "flat"), backend=backend)
        opt = dpcompile.DPOptimizer(adam, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B,
                                    loss_reduction="mean")
    V = lm.config.vocab_size
    idx = torch.randint(0, V, (B, T + 1), device=device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=(device == "cuda")):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    times, loss = [], None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if gated and i == warmup - 1:
            t_gate = time.perf_counter()
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "GO":
                raise SystemExit("bench_memarc: the driver went away before timing")
            t_start += time.perf_counter() - t_gate  # the wait is not part of the warm-up time
    # one more step under a saved-tensor hook: the bytes the compiled graph keeps for backward (not parameters)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    out = {"tokens_per_s": B * T / statistics.median(times),
           "saved_act_gib": sum(saved.values()) / 2**30,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
           "trainable_params": sum(p.numel() for p in trainable),
           "params": sum(p.numel() for p in model.parameters()),
           "loss": float(loss), "first_steps_s": time.perf_counter() - t_start - sum(times)}
    return out


def _meta(small: bool) -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not small else "cpu"
    return {"gpus": 0 if small else 1, "gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--B", type=int, default=None, help="batch size (default 8; 2 with --small)")
    ap.add_argument("--T", type=int, default=None, help="sequence length (default 1024; 32 with --small)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    ap.add_argument("--small", action="store_true", help="CPU smoke test with tiny configs")
    ap.add_argument("--backend", default=None, help="flashdp (default) or flashdp_eager (default with --small)")
    ap.add_argument("--budget-s", type=float, default=550.0, help="wall-clock budget for the whole call")
    ap.add_argument("--results", default=None, help="append records here (default benchmarks/results.json; "
                                                        "with --small: nothing unless given)")
    ap.add_argument("--out", default=None, help="also write the records and the updated results file here")
    ap.add_argument("--note", default="", help="text for the records' note field")
    ap.add_argument("--parallel", type=int, default=1,
                    help="warm up this many modes of a workload at once (each in its own process; timed in turn)")
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    B = args.B or (2 if args.small else 8)
    T = args.T or (32 if args.small else 1024)
    backend = args.backend or ("flashdp_eager" if args.small else "flashdp")
    if args.one:  # child process: one mode
        print(json.dumps(run_mode(*args.one, B, T, args.steps, args.warmup, args.small, backend, args.gated)),
              flush=True)
        return

    from harness import _run_batch  # the harness's process-per-mode driver and READY/GO handshake

    def command(label, mode, profile, gated):
        return [sys.executable, os.path.abspath(__file__), "--one", label.split()[0], mode, "--B", str(B),
                "--T", str(T), "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", backend] + \
            (["--small"] if args.small else []) + (["--gated"] if gated else [])

    t_begin = time.time()
    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    n = max(1, args.parallel)
    for workload in args.workloads.split(","):
        label = f"{workload} B={B} T={T}"
        for batch in [modes[i:i + n] for i in range(0, len(modes), n)]:  # dp-full (the ratios' base) comes first
            left = args.budget_s - (time.time() - t_begin)
            if left < 30:
                rows += [{"workload": label, "mode": m, "error": f"skipped: time budget ({args.budget_s:.0f} s)"}
                         for m in batch]
                continue
            t0 = time.time()
            for rec in _run_batch(label, batch, False, left - 5, command):
                rec["wall_s"] = time.time() - t0
                if "tokens_per_s" in rec:
                    print(f"    {rec['mode']}: {rec['tokens_per_s']:.0f} tok/s, peak {rec['peak_mem_gib']} GiB, "
                          f"warm after {rec['first_steps_s']:.0f} s", flush=True)
                rows.append(rec)

    meta = _meta(args.small)
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["mode"] == "dp-full"
                     and "tokens_per_s" in b), None)
        if "tokens_per_s" in r:
            r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            r["memory_ratio"] = (r["peak_mem_gib"] / base["peak_mem_gib"]
                                 if base and r["peak_mem_gib"] and base["peak_mem_gib"] else None)
        r.update(meta)
        r["baseline"] = "dp-full"  # its ratios are not against non-DP compiled: plots.py leaves such records out
        r["note"] = ("issue 6 (memarc): ratios vs dp-full of the same run; " + ("--small CPU smoke test; " if args.small
                     else "") + args.note).strip()

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = args.results or (None if args.small else os.path.join(HERE, "results.json"))
    if results:
        old = json.load(open(results)) if os.path.exists(results) else []
        with open(results, "w") as f:
            json.dump(old + rows, f, indent=1)
        if args.out:
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(old + rows, f, indent=1)
    if args.out:
        with open(os.path.join(args.out, "memarc_rows.json"), "w") as f:
            json.dump(rows, f, indent=1)

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "–"

    def target(r, lower):  # issue 6: side >= 2.5x lower peak at >= 1.0x tok/s; reversible >= 2x lower peak
        if lower is None or r["mode"] not in ("dp-side", "dp-rev"):
            return ""
        ok = lower >= 2.5 and r["throughput_ratio"] >= 1.0 if r["mode"] == "dp-side" else lower >= 2.0
        return "met" if ok else "missed"

    print(f"\n{meta}  (ratios vs dp-full; 'x lower' = dp-full peak / peak; targets: side >= 2.5x lower at "
          ">= 1.0x tok/s, rev >= 2x lower)")
    print("| workload | mode | tok/s | vs dp-full | peak GiB | mem ratio | x lower | target | saved GiB | trainable |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            lower = 1 / r["memory_ratio"] if r.get("memory_ratio") else None
            tok = f"{r['tokens_per_s'] / 1e3:.1f}k" if r["tokens_per_s"] >= 1e3 else f"{r['tokens_per_s']:.0f}"
            print(f"| {r['workload']} | {r['mode']} | {tok} | {fmt(r['throughput_ratio'], '.2f')} "
                  f"| {fmt(r['peak_mem_gib'], '.2f')} | {fmt(r['memory_ratio'], '.2f')} | {fmt(lower, '.2f')} "
                  f"| {target(r, lower)} | {r['saved_act_gib']:.3f} | {r['trainable_params'] / 1e6:.2f}M |")
        else:
            print(f"| {r['workload']} | {r['mode']} | {r['error']} | | | | | | | |")


if __name__ == "__main__":
    main()
