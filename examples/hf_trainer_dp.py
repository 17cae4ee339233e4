"""DP fine-tuning with the Hugging Face Trainer: dpcompile.hf.DPTrainer (see docs/huggingface.md).

    python examples/hf_trainer_dp.py                           # tiny Llama on the Zen of Python, about a minute
    python examples/hf_trainer_dp.py --model smollm2-135m --data shakespeare --max-examples 4000 --epochs 1

Each example is one line of text. DPTrainer samples Poisson batches (expected size --batch-size), splits them into
micro-batches of --micro-batch-size, compiles the per-sample loss with the flashdp backend, wraps the Trainer's
optimizer in DPOptimizer (sigma calibrated for --epsilon) and logs the epsilon spent.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import TrainingArguments

from dpcompile.data import load_corpus, load_model
from dpcompile.hf import DPTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--data", default="zen")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="expected (Poisson) batch size")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.get_input_embeddings().weight.requires_grad_(False)  # the (tied) token embedding stays frozen
    lines = [ln for ln in load_corpus(args.data).train.splitlines() if ln.strip()][:args.max_examples]
    dataset = [ids for ids in (tok(ln)["input_ids"][:args.max_length] for ln in lines) if len(ids) >= 2]
    out = args.out or tempfile.mkdtemp(prefix="dpcompile-trainer-")
    targs = TrainingArguments(output_dir=out, num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.micro_batch_size, learning_rate=1e-3,
                              logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = DPTrainer(model=model, args=targs, train_dataset=dataset, target_epsilon=args.epsilon,
                        target_delta=args.delta, max_grad_norm=1.0, clipping="per_layer",
                        expected_batch_size=args.batch_size, pad_token_id=tok.pad_token_id,
                        max_length=args.max_length)
    trainer.train()
    print(f"{len(dataset)} examples; epsilon spent: {trainer.get_epsilon():.3f} at delta={args.delta}")
    model.eval()
    enc = tok("Beautiful is", return_tensors="pt").to(model.device)
    gen = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    print("sample:", repr(tok.decode(gen[0], skip_special_tokens=True)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print("checkpoint:", out)


if __name__ == "__main__":
    main()
