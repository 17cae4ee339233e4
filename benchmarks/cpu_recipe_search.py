"""Which recipe of `dpcompile train` learns most under DP (issue 23: the CPU default in ten minutes, the GPU
default).

One process per set of trained parameters (compiling is the expensive part, and a compiled step serves every
recipe on the same parameters): the model is loaded and compiled once, then each recipe starts from the loaded
weights, trains with DP-SGD at the target epsilon and again without privacy (same steps, batches, lr), and
reports held-out perplexity before and after. Times are per step, so that a recipe's wall time on the 2-core
machine can be predicted before the CLI runs it.

    python benchmarks/cpu_recipe_search.py --train norms --recipes "B=64,steps=20,lr=2e-3" "B=32,steps=40,lr=2e-3"

--train: blocks (every block), blocks:K (the last K blocks, the CLI's --train-layers K), norms (every norm
weight: RMSNorm/LayerNorm scales, as BitFit trains biases), norms:K (the last K blocks' norms and the final norm),
lora:R[:TARGETS] (dpcompile.memarc.lora of rank R on TARGETS: all (default), attn or mlp projections; the model
trains through memarc.compile and its per-sample loss; the pairs sit in the model, so perplexity and samples are
the adapted model's).
A recipe is B (expected batch), steps, lr, and optionally C, eps (default --epsilon), seed, sched (const | linear:
linear decay to 0), ema (an exponential moving average of the trained weights with this decay, warmed up as
min(ema, (1 + t) / (10 + t)) at step t; perplexity and sample are then the average's: post-processing, no privacy
cost, and it averages out part of the noise's random walk, as De et al. 2022 do). The non-private run of a recipe
is compiled like the CLI's --no-dp (train_run.compile_no_dp).
On a GPU (--device cuda) steps run under bf16 autocast, as the CLI's do.
Appends one JSON line per recipe to --out (default benchmarks/cpu_recipe_search.jsonl).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time

import torch


def parse_recipe(text: str) -> dict:
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        k, v = k.strip(), v.strip()
        if k == "sched":
            out[k] = v
        else:
            out[k] = float(v) if any(c in v for c in ".e") or k in ("lr", "C", "eps") else int(v)
    return out


def select_trainable(model, spec: str, decoder_blocks) -> None:
    """Freeze everything, then unfreeze what `spec` names (see the module docstring)."""
    for p in model.parameters():
        p.requires_grad_(False)
    kind, _, k = spec.partition(":")
    blocks = list(decoder_blocks(model))
    chosen = blocks[len(blocks) - int(k):] if k else blocks
    if kind == "blocks":
        for b in chosen:
            b.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    elif kind == "norms":
        for m in [m for b in chosen for m in b.modules()] + [model.model.norm]:
            if "norm" in type(m).__name__.lower():
                m.requires_grad_(True)
    else:
        raise SystemExit(f"--train {spec}: blocks | blocks:K | norms | norms:K | lora:R[:TARGETS]")


def lora_model(model, spec: str):
    """--train lora:R[:TARGETS]: the memarc model that trains LoRA pairs put in place into `model` (whose own
    forward then includes them: its perplexity is the adapted model's)."""
    from dpcompile import memarc

    _, rank, *targets = spec.split(":")
    return memarc.lora(model, rank=int(rank), targets=targets[0] if targets else "all", copy_model=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--train", default="norms", help="blocks | blocks:K | norms | norms:K | lora:R[:TARGETS]")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--cross-eval-seq-len", type=int, default=None, metavar="L",
                    help="also score before and after training on held-out windows of L tokens (as many tokens as "
                         "--eval-windows x --seq-len): models trained on short windows, scored at another length")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--clipping", default="per_layer")
    ap.add_argument("--mode", default="both", choices=["both", "dp", "no_dp"],
                    help="both (default): each recipe with DP and its non-private baseline; dp or no_dp: one of them")
    ap.add_argument("--recipes", nargs="+", required=True, help="B=..,steps=..,lr=.. [,C=..,eps=..,sched=linear]")
    ap.add_argument("--out", default="benchmarks/cpu_recipe_search.jsonl")
    ap.add_argument("--sample", default=None,
                    help="prompt of the greedy 24-token sample kept with each run, and before training (default: "
                         "the CLI's --sample prompt; '' for none)")
    args = ap.parse_args(argv)

    from dpcompile import data as D
    from dpcompile.cli import DEFAULT_SAMPLE_PROMPT, decoder_blocks, perplexity
    from dpcompile.compile import compile as dp_compile
    from dpcompile.hf import CausalLMLoss
    from dpcompile.privacy.accounting import get_noise_multiplier
    from dpcompile.privacy.optimizer import DPOptimizer
    from dpcompile.privacy.sampling import PoissonDataLoader
    from dpcompile.train_run import _autocast, compile_no_dp, sample_text

    t0 = time.time()
    device = torch.device(args.device)
    autocast = _autocast(device)
    backend = "flashdp" if device.type == "cuda" else "flashdp_eager"
    model, tok = D.load_model(args.model, progress=False)
    model.config.use_cache = False
    lora = lora_model(model, args.train) if args.train.startswith("lora:") else None
    if lora is None:
        select_trainable(model, args.train, decoder_blocks)
    model.to(device).train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in trained)
    start = {n: p.detach().clone() for n, p in trained}
    corpus = D.load_corpus(args.data)
    windows = D.token_windows(corpus.train, tok, args.seq_len)
    held = D.token_windows(corpus.held_out, tok, args.seq_len, max_windows=args.eval_windows)
    N = len(windows)
    L = args.cross_eval_seq_len
    held_x = D.token_windows(corpus.held_out, tok, L, max_windows=max(1, args.eval_windows * args.seq_len // L)) \
        if L else None
    micro_x = max(1, args.micro * args.seq_len // L) if L else None  # the same tokens per forward
    print(f"[search] {args.train}: {n_train} trained parameters, N={N}, load {time.time() - t0:.0f}s", flush=True)

    if lora is None:
        loss_model, inputs = CausalLMLoss(model), lambda ids: (ids,)
        dp_model = dp_compile(loss_model, backend=backend, max_grad_norm=args.C, clipping=args.clipping,
                              loss_reduction="mean", dynamic_seq=False) if args.mode != "no_dp" else None
    else:  # memarc's loss: mean over samples of each sample's token mean, targets given (the next tokens)
        from dpcompile import memarc

        loss_model, inputs = lora, lambda ids: (ids[:, :-1], ids[:, 1:])
        dp_model = memarc.compile(lora, backend=backend, max_grad_norm=args.C, clipping=args.clipping,
                                  loss_reduction="mean", dynamic_seq=False) if args.mode != "no_dp" else None
    no_dp_model = compile_no_dp(loss_model, backend) if args.mode != "dp" else None
    t = time.time()
    ppl0 = perplexity(model, held, args.micro, device, autocast, "eval", False)
    eval_s = time.time() - t
    ppl0_x = perplexity(model, held_x, micro_x, device, autocast, "eval", False) if L else None
    print(f"[search] perplexity before {ppl0:.3f} ({eval_s:.0f}s)" + (f"; at {L} tokens {ppl0_x:.3f}" if L else ""),
          flush=True)
    prompt = DEFAULT_SAMPLE_PROMPT if args.sample is None else args.sample

    def sample():
        """The CLI's sample (train_run.sample_text), the model back in training mode."""
        if not prompt:
            return None
        text = sample_text(model, tok, prompt, device)
        model.train()
        return text

    sample_before = sample()

    def reset():
        with torch.no_grad():
            for n, p in trained:
                p.copy_(start[n])
                p.grad = None

    def train(r: dict, private: bool) -> dict:
        reset()
        B, steps, lr = int(r["B"]), int(r["steps"]), float(r["lr"])
        C, eps = float(r.get("C", args.C)), float(r.get("eps", args.epsilon))
        q = B / N
        gen = torch.Generator().manual_seed(int(r.get("seed", 0)))
        loader = PoissonDataLoader(torch.utils.data.TensorDataset(windows), expected_batch_size=B,
                                   max_physical_batch_size=args.micro, steps=steps, generator=gen)
        inner = torch.optim.AdamW([p for _, p in trained], lr=lr, weight_decay=0.0)
        sched = None
        if r.get("sched", "const") == "linear":
            sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda i: max(0.0, 1.0 - i / steps))
        sigma = get_noise_multiplier(eps, args.delta, q, steps) if private else 0.0
        if private:
            opt = DPOptimizer(inner, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=q * N,
                              loss_reduction="mean", generator=torch.Generator(device).manual_seed(1))
            loader.attach_optimizer(opt)
            fwd = dp_model
        else:
            opt, fwd = inner, no_dp_model
        ema, avg = float(r.get("ema", 0.0)), None
        if ema:
            avg = [p.detach().float().clone() for _, p in trained]
        times = []
        for micro_batches in loader:
            ts = time.time()
            for (ids,) in micro_batches:
                if ids.shape[0] == 0 and not private:
                    continue
                ids = ids.to(device)
                with autocast() if autocast else contextlib.nullcontext():
                    loss = fwd(*inputs(ids))
                if not private:
                    loss = loss * ids.shape[0] / B
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            if avg is not None:
                decay = min(ema, (1 + len(times)) / (10 + len(times)))
                with torch.no_grad():
                    torch._foreach_lerp_(avg, [p.detach().float() for _, p in trained], 1 - decay)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - ts)
        if avg is not None:
            with torch.no_grad():
                for (_, p), a in zip(trained, avg):
                    p.copy_(a)
        ppl = perplexity(model, held, args.micro, device, autocast, "eval", False)
        cross = {"ppl_at_seq_len": {L: perplexity(model, held_x, micro_x, device, autocast, "eval", False)}} if L \
            else {}
        return {"ppl": ppl, **cross, "sample": sample(), "sigma": sigma, "epsilon": eps if private else None,
                "first_step_s": round(times[0], 1),
                "step_s": round(sorted(times[1:])[len(times[1:]) // 2], 3) if len(times) > 1 else None,
                "train_s": round(sum(times), 1)}

    baselines = {}
    for text in args.recipes:
        r = parse_recipe(text)
        rec = {"train": args.train, "trained_params": n_train, "recipe": r, "seq_len": args.seq_len,
               "clipping": args.clipping, "N": N, "ppl_before": ppl0, "sample_before": sample_before,
               **({"ppl_before_at_seq_len": {L: ppl0_x}} if L else {}),
               "eval_s": round(eval_s, 1),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        if args.mode != "no_dp":
            rec["dp"] = train(r, True)
        key = tuple(sorted((k, v) for k, v in r.items() if k not in ("C", "eps")))  # what the baseline depends on
        if args.mode != "dp":
            if key not in baselines:
                baselines[key] = train(r, False)
            rec["no_dp"] = baselines[key]
        if args.mode == "both":
            gain, dp_gain = ppl0 - rec["no_dp"]["ppl"], ppl0 - rec["dp"]["ppl"]
            rec["recovered"] = round(dp_gain / gain, 3) if gain > 0 else None
        print(f"[search] {json.dumps(rec)}", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    reset()


if __name__ == "__main__":
    main()
