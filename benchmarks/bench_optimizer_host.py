"""Where DPOptimizer.step's host time goes (NOTES 34): the enqueue time of each part of a DP step's optimizer call
against AdamW's own step, on a model_zoo model compiled per_layer with the length static (the harness's row).

The parts are timed by wrapping DPOptimizer's methods (no code of the package changes): the replay and logical-batch
guards, the coverage and sensitivity checks, the randomized-norm accounting, the noise (and inside it the draw, the
views, the two foreach ops and the .grad assignments, timed again one by one on the same tensors), AdamW's step and
the final zero_grad. The GPU is synchronized before every step, so each number is host time (enqueue), median of
--steps steps.

    python benchmarks/bench_optimizer_host.py --model gpt2-small --B 8 --T 1024            # GPU
    python benchmarks/bench_optimizer_host.py --model gpt2-tiny --B 2 --T 16 --device cpu  # a quick check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(store: dict, key: str, fn, sync):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        store.setdefault(key, []).append(time.perf_counter() - t0)
        return out
    return wrapper


def _build(name: str, T: int, device: str):
    from model_zoo import GPT, build_model

    if name == "gpt2-tiny":  # the 12-block shape of gpt2-small at width 32 (147 trainable tensors), for CPU checks
        return GPT(12, 32, 2, T=T, vocab=256).to(device)
    return build_model(name, T=T).to(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the medians as JSON here")
    args = ap.parse_args(argv)

    import dpcompile

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = _build(args.model, args.T, device)
    for p in model.frozen():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.lm_head.out_features
    x = torch.randint(0, vocab, (args.B, args.T), device=device)
    y = torch.randint(0, vocab, (args.B, args.T), device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    step_model = dpcompile.compile(model, max_grad_norm=1.0, clipping="per_layer", loss_reduction="mean",
                                   dynamic_seq=False)
    opt = dpcompile.DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=args.B)
    parts: dict = {}
    for name in ("_skip_or_refuse_step", "_check_step_settings", "_check_clipping", "_accounting", "_noise_params",
                 "_after_step"):
        setattr(opt, name, _timed(parts, name, getattr(opt, name), sync))
    inner = opt.original_optimizer
    inner.step = _timed(parts, "AdamW.step", inner.step, sync)
    inner.zero_grad = _timed(parts, "zero_grad", inner.zero_grad, sync)

    def fwd_bwd():
        with amp:
            loss = step_model(x, y)
        loss.backward()

    total = []
    for i in range(args.steps + 3):
        fwd_bwd()
        sync()
        t0 = time.perf_counter()
        opt.step()
        total.append(time.perf_counter() - t0)
        sync()
        if i == 2:  # compile and warm-up steps out
            parts.clear()
            total.clear()
    ms = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
    ms["DPOptimizer.step"] = 1e3 * statistics.median(total)

    # the noise's own pieces, again on the same tensors (clipped sums as the backward left them)
    fwd_bwd()
    sync()
    sums = [p.grad for p in params]
    n = sum(p.numel() for p in params)
    pieces = {"draw": lambda: torch.randn((n,), device=device),
              "views": lambda: torch._utils._unflatten_dense_tensors(flat, params),
              "foreach_mul_": lambda: torch._foreach_mul_(views, 0.5),
              "foreach_add_": lambda: torch._foreach_add_(views, sums, alpha=0.5),
              "set .grad": lambda: [setattr(p, "grad", g) for p, g in zip(params, sums)]}
    flat = torch.randn((n,), device=device)
    views = torch._utils._unflatten_dense_tensors(flat, params)
    for key, fn in pieces.items():
        ts = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ms[f"  noise: {key}"] = 1e3 * statistics.median(ts)
    # AdamW alone (the non-DP row's optimizer) on the same gradients
    plain = torch.optim.AdamW(params, lr=1e-4)
    ts = []
    for _ in range(args.steps):
        for p, g in zip(params, sums):
            p.grad = g
        sync()
        t0 = time.perf_counter()
        plain.step()
        plain.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t0)
    ms["non-DP AdamW.step+zero_grad"] = 1e3 * statistics.median(ts)
    meta = {"model": args.model, "B": args.B, "T": args.T, "tensors": len(params), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    print(f"{args.model} B={args.B} T={args.T}, {len(params)} trainable tensors, {meta['device']}, torch "
          f"{torch.__version__}: host ms a step (median of {args.steps})")
    for k, v in ms.items():
        print(f"  {k:34s} {v:7.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "host_ms": ms}, indent=1))
    return ms


if __name__ == "__main__":
    main()
