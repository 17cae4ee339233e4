"""DP-SGD fine-tuning of a tiny GPT-2 (transformers) on generated text with the flashdp backend, on CPU.

    python examples/train_gpt_dp.py                 # defaults: 30 steps, B=8, T=32, per-layer clipping
    python examples/train_gpt_dp.py --backend flashdp_eager --clipping flat --steps 10

The first step is checked against a float64 per-sample loop (the gradient contract); later steps add Gaussian
noise sigma*C to the clipped sum and divide by the batch size (a minimal stand-in for dpcompile's optimizer).
"""
from __future__ import annotations

import argparse
import copy
import this  # the Zen of Python, shipped with CPython: our text, no downloads
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import dpcompile


def corpus() -> str:
    return "".join({**{chr(i + c): chr((i + 13) % 26 + c) for i in range(26) for c in (65, 97)}}.get(ch, ch)
                   for ch in this.s)


def batches(text: str, vocab: dict, B: int, T: int, gen: torch.Generator):
    ids = torch.tensor([vocab[c] for c in text])
    while True:
        start = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        chunk = torch.stack([ids[s: s + T + 1] for s in start.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


class LMLoss(torch.nn.Module):
    """Per-sample mean token loss, averaged over the batch: separable, as DP needs (no batch-wide token mean)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, idx, targets):
        logits = self.lm(input_ids=idx).logits
        tok = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return tok.view(targets.shape).mean(1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--backend", default="flashdp", choices=["flashdp", "flashdp_eager"])
    ap.add_argument("--clipping", default="per_layer", choices=["flat", "per_layer", "per_param"])
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--noise-multiplier", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(0)
    text = corpus()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=args.seq, n_embd=64, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = LMLoss(lm)
    opts = dict(max_grad_norm=args.max_grad_norm, clipping=args.clipping, loss_reduction="mean")
    print(dpcompile.explain(copy.deepcopy(model), (torch.zeros(2, args.seq, dtype=torch.long),) * 2, **opts))
    compiled = dpcompile.compile(model, backend=args.backend, **opts)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    data = batches(text, vocab, args.batch, args.seq, gen)
    C = args.max_grad_norm
    t0 = time.time()
    for step in range(args.steps):
        idx, tgt = next(data)
        optim.zero_grad(set_to_none=True)
        loss = compiled(idx, tgt)
        loss.backward()
        if step == 0:
            check_contract(model, idx, tgt, opts)
        for p in model.parameters():  # noise once per step on the clipped sum, then the mean
            p.grad.add_(torch.randn(p.shape, generator=gen) * args.noise_multiplier * C).div_(args.batch)
        optim.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}  ({time.time() - t0:.1f}s)", flush=True)
    print(f"done: {args.steps} DP steps, sigma={args.noise_multiplier}, C={C}, {args.clipping} clipping")


def check_contract(model, idx, tgt, opts) -> None:
    from dpcompile.testing.oracle import reference_clipped_grads

    want = reference_clipped_grads(model, lambda m, i, t: m(i, t), (idx, tgt), max_grad_norm=opts["max_grad_norm"],
                                   clipping=opts["clipping"])
    err = max((p.grad.double() - want[n]).abs().max().item() for n, p in model.named_parameters())
    print(f"step 0 clipped gradient vs float64 per-sample loop: max abs error {err:.2e}")
    if err > 1e-4:
        raise SystemExit("clipped gradient does not match the per-sample oracle")


if __name__ == "__main__":
    main()
