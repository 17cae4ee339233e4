"""DP fine-tuning of a transformers causal LM with a plain PyTorch loop (the loop of docs/huggingface.md).

    python examples/hf_plain_loop_dp.py                          # tiny GPT-2 on the Zen of Python, seconds
    python examples/hf_plain_loop_dp.py --model smollm2-135m --data shakespeare --max-examples 2000

Each example is one line of text (padded per sample, masked per sample); make_private compiles the per-sample loss
with the flashdp backend, samples Poisson batches and calibrates sigma for the target epsilon.
"""
from __future__ import annotations

import argparse

import torch

import dpcompile
from dpcompile.data import load_corpus, load_model
from dpcompile.hf import CausalLMLoss, collate_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--data", default="zen")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--max-examples", type=int, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.get_input_embeddings().weight.requires_grad_(False)  # the tied table: frozen (see docs/cli.md)
    lines = [ln for ln in load_corpus(args.data).train.splitlines() if ln.strip()][:args.max_examples]
    dataset = [tok(ln)["input_ids"][:args.max_length] for ln in lines]
    dataset = [ids for ids in dataset if len(ids) >= 2]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size,
        collate_fn=lambda s: collate_causal_lm(s, tok.pad_token_id, max_length=args.max_length))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    backend = "flashdp" if torch.cuda.is_available() else "flashdp_eager"
    dp_model, dp_optimizer, dp_loader = dpcompile.make_private(
        CausalLMLoss(model), optimizer, loader, target_epsilon=args.epsilon, target_delta=1e-5,
        epochs=args.epochs, max_grad_norm=1.0, clipping="per_layer", max_physical_batch_size=args.batch_size,
        backend=backend, generator=torch.Generator().manual_seed(1))
    print(f"{len(dataset)} examples, sigma={dp_optimizer.noise_multiplier:.3f}, {len(dp_loader)} steps per epoch")
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for micro_batches in dp_loader:  # one Poisson logical batch
            for batch in micro_batches:
                loss = dp_model(batch["input_ids"], batch["attention_mask"])
                loss.backward()
                total, n = total + loss.item() * len(batch["input_ids"]), n + len(batch["input_ids"])
            dp_optimizer.step()
        print(f"epoch {epoch}: mean loss {total / max(n, 1):.3f}, epsilon {dp_optimizer.get_epsilon(1e-5):.2f}")
    model.eval()
    enc = tok("Beautiful is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    print("sample:", repr(tok.decode(out[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
