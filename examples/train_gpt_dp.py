"""DP-SGD training of a tiny GPT-2 (transformers) on generated text with dpcompile, on CPU.

    python examples/train_gpt_dp.py                 # defaults: eps = 8, 2 epochs, B = 8, T = 32, per-layer clipping
    python examples/train_gpt_dp.py --backend flashdp_eager --clipping flat --epsilon 3

make_private compiles the model (flashdp backend), wraps the optimizer (noise once per logical step, accounting)
and samples Poisson batches; the first step's clipped gradient is checked against a float64 per-sample loop.
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


def windows(text: str, vocab: dict, T: int) -> torch.utils.data.TensorDataset:
    """Every (T+1)-character window of the text, as (input, next-character target) pairs."""
    ids = torch.tensor([vocab[c] for c in text])
    chunk = ids.unfold(0, T + 1, 1)
    return torch.utils.data.TensorDataset(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())


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
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="expected (Poisson) batch size")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--backend", default="flashdp", choices=["flashdp", "flashdp_eager"])
    ap.add_argument("--clipping", default="per_layer", choices=["flat", "per_layer", "per_param"])
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(0)
    text = corpus()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    data = windows(text, vocab, args.seq)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=args.seq, n_embd=64, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = LMLoss(lm)
    opts = dict(max_grad_norm=args.max_grad_norm, clipping=args.clipping, loss_reduction="mean")
    print(dpcompile.explain(copy.deepcopy(model), (torch.zeros(2, args.seq, dtype=torch.long),) * 2, **opts))

    dp_model, optimizer, loader = dpcompile.make_private(
        model, torch.optim.AdamW(model.parameters(), lr=args.lr),
        torch.utils.data.DataLoader(data, batch_size=args.batch), target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, backend=args.backend, max_physical_batch_size=args.batch * 2,
        generator=torch.Generator().manual_seed(1), **opts)
    print(f"N={len(data)} windows, q={loader.sample_rate:.4f}, {args.epochs} epochs x {len(loader)} steps, "
          f"sigma={optimizer.noise_multiplier:.3f} for eps={args.epsilon} at delta={args.delta}")
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        for micro_batches in loader:  # one logical Poisson batch
            losses = []
            for idx, tgt in micro_batches:  # physical micro-batches
                loss = dp_model(idx, tgt)
                loss.backward()  # clipped per-sample sums accumulate in .grad
                losses.append(loss.item() * idx.shape[0])
            if step == 0:
                check_contract(model, micro_batches, opts)
            optimizer.step()  # noise once, divide by the expected batch size, step, account
            if step % 10 == 0:
                size = sum(mb[0].shape[0] for mb in micro_batches)
                print(f"epoch {epoch} step {step:4d}  batch {size:3d}  loss {sum(losses) / max(size, 1):.3f}  "
                      f"eps {optimizer.get_epsilon(args.delta):.2f}  ({time.time() - t0:.1f}s)", flush=True)
            step += 1
    print(f"done: {step} DP steps, eps = {optimizer.get_epsilon(args.delta):.2f} at delta = {args.delta} "
          f"(sigma={optimizer.noise_multiplier:.3f}, C={args.max_grad_norm}, {args.clipping} clipping)")


def check_contract(model, micro_batches, opts) -> None:
    """.grad after the logical batch's backward == sum of per-sample clipped gradients (float64 oracle)."""
    from dpcompile.testing.oracle import reference_clipped_grads

    batch = tuple(torch.cat(parts) for parts in zip(*micro_batches))
    want = reference_clipped_grads(model, lambda m, i, t: m(i, t) * i.shape[0], batch,
                                   max_grad_norm=opts["max_grad_norm"], clipping=opts["clipping"])
    err = max((p.grad.double() - want[n]).abs().max().item() for n, p in model.named_parameters())
    print(f"step 0: clipped gradient vs float64 per-sample loop: max abs error {err:.2e}")
    if err > 1e-4:
        raise SystemExit("clipped gradient does not match the per-sample oracle")


if __name__ == "__main__":
    main()
