"""The `dpcompile` command: `train` (DP fine-tuning of a causal LM on text), `explain` (the per-parameter plan),
`bench` (runs the benchmark harness, benchmarks/harness.py, of a source checkout).

    dpcompile train                                   # SmolLM2-135M on Shakespeare, epsilon = 8, CPU or GPU
    dpcompile train --epsilon 3 --out runs/eps3
    dpcompile train --model tiny-llama --data zen --steps 4     # a smoke run in seconds
    dpcompile explain smollm2-135m
    dpcompile bench --help
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .options import EXACT_LINEAR_STRATEGIES

_EXACT = ", ".join(EXACT_LINEAR_STRATEGIES)

#: defaults that depend on the device: a CPU run finishes in minutes, a GPU run trains the whole model on the corpus
PROFILES = {
    "cpu": dict(seq_len=128, batch_size=8, micro_batch_size=8, steps=20, train_layers=2, eval_windows=24, lr=5e-4),
    "cuda": dict(seq_len=256, batch_size=256, micro_batch_size=32, steps=None, epochs=3.0, train_layers=None,
                 eval_windows=512, lr=5e-4),
}


def _log(msg: str) -> None:
    print(f"[dpcompile] {msg}", file=sys.stderr, flush=True)


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
        return v
    return parse


def _epsilon(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf for no privacy), got {s!r}")
    return v


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clipping", default="per_layer", choices=["flat", "per_layer", "per_param"],
                   help="clipping groups (default per_layer; every style bounds the whole per-sample norm by C)")
    p.add_argument("--clip-fn", default="abadi", choices=["abadi", "automatic"],
                   help="min(1, C/|g|) (abadi, default) or C/(|g|+0.01) (automatic)")
    p.add_argument("--max-grad-norm", type=_positive(float), default=1.0, metavar="C",
                   help="per-sample gradient norm bound C (default 1.0)")
    p.add_argument("--strategy", default=None,
                   help=f"strategy of linear weight sites: auto (the planner's cheapest, default) or one of {_EXACT} "
                        "(the backend option 'strategy'; see docs/clipping.md)")
    p.add_argument("--train-layers", type=int, default=None, metavar="N",
                   help="train only the last N transformer blocks (and the final norm); -1 = all. Default: 2 on CPU, "
                        "all on a GPU")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the token embedding (tied to the LM head in SmolLM2/GPT-2). Off by default: a "
                        "tied table materializes B x vocab x d per-sample gradients, and noise on 28M rarely-used "
                        "embedding rows costs utility")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dpcompile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    ap.add_argument("--version", action="version", version=f"dpcompile {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{train,explain,bench}")

    t = sub.add_parser("train", help="DP fine-tune a causal LM on a text corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="DP fine-tuning (DP-SGD with Poisson sampling, per-sample clipping in the compiled "
                                   "graph, Gaussian noise, PLD accounting) of a causal LM on text. With no options: "
                                   "SmolLM2-135M on Shakespeare at epsilon=8, delta=1e-5; on a CPU a short "
                                   "demonstration run, on a GPU 3 epochs of the whole model.")
    t.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m | tiny-llama | tiny-gpt2 | a .gguf file | a save_pretrained directory")
    t.add_argument("--data", default="shakespeare", help="shakespeare | zen | a text file | a directory of .txt")
    priv = t.add_mutually_exclusive_group()
    priv.add_argument("--epsilon", type=_epsilon, default=8.0,
                      help="target epsilon; sigma is calibrated for the whole run (inf: no privacy)")
    priv.add_argument("--sigma", type=_positive(float), default=None,
                      help="noise multiplier instead of a target epsilon (epsilon is then reported)")
    priv.add_argument("--no-dp", action="store_true",
                      help="non-private baseline: same sampling and optimizer, no clipping, no noise")
    t.add_argument("--delta", type=float, default=1e-5, help="target delta")
    t.add_argument("--epochs", type=_positive(float), default=None,
                   help="passes over the training windows (in expectation); default: --steps on CPU, 3 on a GPU")
    t.add_argument("--steps", type=_positive(int), default=None,
                   help="logical (Poisson) batches; overrides --epochs. Default: 20 on CPU")
    t.add_argument("--batch-size", type=_positive(int), default=None,
                   help="expected logical batch size (Poisson); default 8 on CPU, 256 on a GPU")
    t.add_argument("--micro-batch-size", type=_positive(int), default=None,
                   help="physical micro-batch size (memory); default 8 on CPU, 32 on a GPU")
    t.add_argument("--seq-len", type=_positive(int), default=None,
                   help="tokens per example window; default 128 on CPU, 256 on a GPU")
    t.add_argument("--max-windows", type=_positive(int), default=None,
                   help="use only the first N training windows (N is what the accountant sees)")
    t.add_argument("--lr", type=_positive(float), default=None, help="AdamW learning rate (default 5e-4)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows for perplexity before and after (0: skip); default 24 CPU, 512 GPU")
    _add_model_options(t)
    t.add_argument("--backend", default="auto", choices=["auto", "flashdp", "flashdp_eager"],
                   help="auto: flashdp (Inductor + Triton kernels) on a GPU, flashdp_eager on CPU")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--secure-mode", action="store_true",
                   help="OS-random sampling and noise (no reproducibility; see docs/privacy.md)")
    t.add_argument("--out", default="dpcompile-out", help="output directory: checkpoint, tokenizer, report.json")
    t.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    t.add_argument("--sample", default="To be, or not to be,",
                   help="prompt for a short generate() at the end ('' to skip)")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    e = sub.add_parser("explain", help="the per-parameter DP plan of a model (group, site, strategy, cost)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", nargs="?", default="smollm2-135m",
                   help="smollm2-135m | tiny-llama | tiny-gpt2 | a .gguf file | a save_pretrained directory")
    e.add_argument("--seq-len", type=_positive(int), default=64)
    e.add_argument("--batch-size", type=_positive(int), default=2, help="batch size of the example input (>= 2)")
    _add_model_options(e)

    sub.add_parser("bench", help="run benchmarks/harness.py of a source checkout (arguments are passed on; try "
                                 "`dpcompile bench --help`)",
                   add_help=False)
    return ap


# ---- helpers --------------------------------------------------------------------------------------------------

def _strategy_option(strategy: Optional[str]) -> dict:
    """{"strategy": s} if this dpcompile's options know the key (the planner adds it), {} for the default."""
    if strategy in (None, "", "auto"):
        return {}
    if strategy == "randomized":
        raise SystemExit("dpcompile: --strategy randomized estimates per-sample norms with probes, which changes the "
                         "privacy analysis (docs/randomized.md); `dpcompile train` calibrates sigma for exact norms "
                         f"only. Use one of {_EXACT} here, or the Python API for randomized norms")
    from .errors import OptionsError
    from .options import DPOptions

    try:
        DPOptions.parse({"strategy": strategy})
    except OptionsError as err:
        if "unknown" in str(err):
            raise SystemExit(f"dpcompile: --strategy {strategy}: this version of dpcompile has no strategy option "
                             "(the planner chooses every site's strategy itself)") from None
        raise SystemExit(f"dpcompile: --strategy {strategy}: {err}") from None
    return {"strategy": strategy}


def decoder_blocks(model):
    """The model's list of transformer blocks: the longest nn.ModuleList in it (model.layers, transformer.h, ...)."""
    from torch import nn

    best = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return best


def freeze(model, train_layers: Optional[int], train_embeddings: bool) -> tuple[int, int]:
    """Freeze the token embedding (unless train_embeddings) and every block but the last `train_layers` (None or
    -1: all). Returns (trainable, total) parameter counts."""
    if not train_embeddings:  # a tied LM head is the same tensor: frozen with it
        model.get_input_embeddings().weight.requires_grad_(False)
    if train_layers is not None and train_layers >= 0:
        blocks = decoder_blocks(model)
        if blocks is None:
            raise SystemExit("dpcompile: --train-layers: found no list of transformer blocks in this model")
        if train_layers > len(blocks):
            raise SystemExit(f"dpcompile: --train-layers {train_layers}: the model has only {len(blocks)} blocks")
        for b in list(blocks)[:len(blocks) - train_layers]:
            b.requires_grad_(False)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def perplexity(model, windows, micro_batch_size: int, device, autocast=None, desc: str = "eval",
               progress: bool = True) -> float:
    """exp(mean next-token cross-entropy) over all tokens of the held-out windows."""
    import torch
    import torch.nn.functional as F

    if windows is None or len(windows) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    it = range(0, len(windows), micro_batch_size)
    bar = _bar(it, desc, progress, leave=False)
    with torch.no_grad():
        for i in bar:
            ids = windows[i:i + micro_batch_size].to(device)
            with autocast() if autocast else _nullcontext():
                logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _bar(iterable, desc: str, enabled: bool, total=None, leave=True):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, file=sys.stderr)


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"dpcompile: --device {name}: no CUDA device is available")
    return dev


# ---- train ----------------------------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> dict:
    import torch

    from . import data as D
    from .compile import compile as dp_compile
    from .hf import CausalLMLoss
    from .privacy.accounting import PrivacyAccountant, get_epsilon, get_noise_multiplier
    from .privacy.optimizer import DPOptimizer
    from .privacy.sampling import PoissonDataLoader

    t_start = time.time()
    device = _resolve_device(args.device)
    prof = PROFILES["cuda" if device.type == "cuda" else "cpu"]
    seq_len = args.seq_len or prof["seq_len"]
    B = args.batch_size or prof["batch_size"]
    micro = args.micro_batch_size or min(prof["micro_batch_size"], B)
    lr = args.lr or prof["lr"]
    train_layers = args.train_layers if args.train_layers is not None else prof["train_layers"]
    eval_windows = args.eval_windows if args.eval_windows is not None else prof["eval_windows"]
    private = not args.no_dp and not (args.sigma is None and math.isinf(args.epsilon))
    if not 0 < args.delta < 1:
        raise SystemExit(f"dpcompile: --delta {args.delta} must be in (0, 1)")
    backend = args.backend if args.backend != "auto" else ("flashdp" if device.type == "cuda" else "flashdp_eager")
    progress = not args.no_progress
    torch.manual_seed(args.seed)

    _log(f"loading model {args.model} ...")
    model, tok = D.load_model(args.model, progress=progress)
    model.to(device).train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    n_train, n_total = freeze(model, train_layers, args.train_embeddings)
    _log(f"{type(model).__name__}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trained "
         f"({'all blocks' if train_layers in (None, -1) else f'last {train_layers} blocks'}"
         f"{', embeddings too' if args.train_embeddings else ', embeddings frozen'}) on {device}")

    _log(f"loading corpus {args.data} ...")
    corpus = D.load_corpus(args.data)
    windows = D.token_windows(corpus.train, tok, seq_len, max_windows=args.max_windows)
    held = D.token_windows(corpus.held_out, tok, seq_len, max_windows=eval_windows) if eval_windows > 0 else None
    N = len(windows)
    if B > N:
        raise SystemExit(f"dpcompile: --batch-size {B} is larger than the {N} training windows")
    q = B / N
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None or prof["steps"] is None:
        steps = max(1, math.ceil((args.epochs or prof.get("epochs", 1.0)) / q))
    else:
        steps = prof["steps"]
    _log(f"{corpus.source}: {N} training windows of {seq_len} tokens, "
         f"{0 if held is None else len(held)} held-out windows")

    autocast = None
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

    ppl_before = perplexity(model, held, micro, device, autocast, "held-out perplexity (before)", progress)
    if held is not None:
        _log(f"held-out perplexity before training: {ppl_before:.3f}")

    sigma = None
    if private:
        if args.sigma is not None:
            sigma = args.sigma
        else:
            sigma = get_noise_multiplier(args.epsilon, args.delta, q, steps)
        if args.delta > 1.0 / N:
            _log(f"warning: delta={args.delta} is larger than 1/N = {1 / N:.2e}; the usual choice is delta << 1/N")
    gen = None if args.secure_mode else torch.Generator().manual_seed(args.seed)
    loader = PoissonDataLoader(torch.utils.data.TensorDataset(windows), expected_batch_size=B,
                               max_physical_batch_size=micro, steps=steps, generator=gen,
                               secure_mode=args.secure_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    loss_model = CausalLMLoss(model)
    dp_opts = dict(max_grad_norm=args.max_grad_norm, clipping=args.clipping, clip_fn=args.clip_fn,
                   loss_reduction="mean", **_strategy_option(args.strategy))
    if private:
        step_model = dp_compile(loss_model, backend=backend, **dp_opts)
        optimizer = DPOptimizer(inner, noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
                                expected_batch_size=q * N, loss_reduction="mean", secure_mode=args.secure_mode,
                                generator=None if args.secure_mode else torch.Generator(device).manual_seed(
                                    args.seed + 1),
                                accountant=PrivacyAccountant("pld"), sample_rate=q)
        eps_planned = get_epsilon(sigma, q, steps, args.delta)
        _log(f"DP-SGD: sigma={sigma:.4f}, q={q:.3g} (expected batch {B}), {steps} steps -> epsilon={eps_planned:.3f} "
             f"at delta={args.delta}; C={args.max_grad_norm}, {args.clipping} clipping, backend {backend}")
        if backend == "flashdp_eager":
            _log("the first step compiles the model (Dynamo + the DP pass): on a CPU this takes a few minutes")
    else:
        step_model, optimizer, eps_planned = loss_model, inner, 0.0
        _log(f"non-private baseline: no clipping, no noise; {steps} steps of expected batch {B}")

    tokens, t0, loss_ema, last_loss = 0, None, None, float("nan")
    bar = _bar(loader, "DP training" if private else "training", progress, total=steps)
    step_times = []
    for step, micro_batches in enumerate(bar):
        ts = time.time()
        total, count = 0.0, 0
        for (ids,) in micro_batches:
            ids = ids.to(device)
            if ids.shape[0] == 0 and not private:
                continue
            with autocast() if autocast else _nullcontext():
                loss = step_model(ids)
            if not private:
                loss = loss * ids.shape[0] / B  # sum of per-sample means / expected batch, as the DP step scales
            loss.backward()
            n = ids.shape[0]
            total += float(loss.detach()) * (n if private else B)
            count += n
            tokens += ids.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            t0, tokens_at_t0 = time.time(), tokens
        step_times.append(time.time() - ts)
        if count:
            last_loss = total / count
            loss_ema = last_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * last_loss
        eps = optimizer.get_epsilon(args.delta) if private else 0.0
        tps = (tokens - tokens_at_t0) / (time.time() - t0) if step > 0 else tokens / step_times[0]
        stats = {"loss": f"{last_loss:.3f}", "tok/s": f"{tps:.0f}", "eps": f"{eps:.2f}" if private else "-"}
        if progress:
            bar.set_postfix(stats)
        elif step % max(1, steps // 20) == 0 or step == steps - 1:
            _log(f"step {step + 1}/{steps}  " + "  ".join(f"{k} {v}" for k, v in stats.items())
                 + f"  ({time.time() - t_start:.0f}s)")
    train_s = time.time() - t_start

    ppl_after = perplexity(model, held, micro, device, autocast, "held-out perplexity (after)", progress)
    eps_spent = optimizer.get_epsilon(args.delta) if private else math.inf
    report = {
        "model": args.model, "data": args.data, "corpus_source": corpus.source, "device": str(device),
        "private": private, "epsilon": eps_spent if private else None,
        "target_epsilon": args.epsilon if private and args.sigma is None else None,
        "delta": args.delta, "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
        "expected_batch_size": B, "micro_batch_size": micro, "seq_len": seq_len, "train_windows": N,
        "max_grad_norm": args.max_grad_norm, "clipping": args.clipping, "clip_fn": args.clip_fn,
        "backend": backend if private else None, "lr": lr, "train_layers": train_layers,
        "train_embeddings": args.train_embeddings, "trainable_parameters": n_train,
        "held_out_windows": 0 if held is None else len(held),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after, "final_loss": last_loss,
        "seconds": round(time.time() - t_start, 1),
        "first_step_seconds": round(step_times[0], 1) if step_times else None,
        "mean_step_seconds": round(sum(step_times[1:]) / max(1, len(step_times) - 1), 2) if step_times else None,
        "command": "dpcompile " + " ".join(getattr(args, "argv", []) or ["train"]),
    }
    if args.sample:
        model.eval()
        enc = tok(args.sample, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        report["sample"] = tok.decode(out[0], skip_special_tokens=True)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # for generate() after loading; training ran without a KV cache
    if not args.no_save:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        (out_dir / "dp_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        report["out"] = str(out_dir)

    print("")
    print("=" * 72)
    print(f"dpcompile train: {args.model} on {args.data} ({N} windows x {seq_len} tokens), {steps} steps, "
          f"{train_s:.0f}s")
    if private:
        print(f"privacy:    epsilon = {eps_spent:.3f} at delta = {args.delta}  "
              f"(sigma = {sigma:.4f}, q = {q:.3g}, C = {args.max_grad_norm}, {args.clipping} clipping)")
    else:
        print("privacy:    none (non-private baseline)")
    if held is not None:
        print(f"perplexity: {ppl_before:.3f} -> {ppl_after:.3f} on {len(held)} held-out windows")
    print(f"final loss: {last_loss:.4f}")
    if "sample" in report:
        print(f"sample:     {report['sample']!r}")
    if "out" in report:
        print(f"checkpoint: {report['out']}  (AutoModelForCausalLM.from_pretrained({report['out']!r}))")
    print("=" * 72)
    return report


# ---- explain / bench ------------------------------------------------------------------------------------------

def explain(args: argparse.Namespace) -> int:
    import torch

    from . import data as D
    from .explain import explain as dp_explain
    from .hf import CausalLMLoss

    _log(f"loading model {args.model} ...")
    model, _ = D.load_model(args.model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    freeze(model, args.train_layers, args.train_embeddings)
    B = max(2, args.batch_size)
    ids = torch.randint(0, model.config.vocab_size, (B, args.seq_len), generator=torch.Generator().manual_seed(0))
    _log(f"tracing one DP step at B={B}, T={args.seq_len} (flashdp_eager) ...")
    plan = dp_explain(CausalLMLoss(model), (ids,), max_grad_norm=args.max_grad_norm, clipping=args.clipping,
                      clip_fn=args.clip_fn, loss_reduction="mean", **_strategy_option(args.strategy))
    print(plan)
    return 0


#: the benchmark harness lives in the source checkout, not in the package: <checkout>/benchmarks/harness.py
_CHECKOUT = Path(__file__).resolve().parent.parent


def bench(argv: Sequence[str], checkout: Optional[Path] = None) -> int:
    """`dpcompile bench ARGS`: run benchmarks/harness.py of the source checkout this package was imported from,
    with ARGS. An installed package has no harness (nothing in it writes into a repository): exit code 2."""
    root = _CHECKOUT if checkout is None else Path(checkout)
    harness = root / "benchmarks" / "harness.py"
    if not (harness.is_file() and (root / "pyproject.toml").is_file()):
        print("dpcompile bench: the benchmark harness (benchmarks/harness.py) is only in a source checkout of "
              f"dpcompile, and this dpcompile ({Path(__file__).resolve().parent}) is not in one. Clone the "
              "repository and run `python benchmarks/harness.py --help` there (or install it with `pip install -e .` "
              "and use `dpcompile bench`)", file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, str(harness), *argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .data import DataError
    from .errors import DPCompileError

    try:
        if args.command == "train":
            args.argv = argv
            train(args)
            return 0
        if args.command == "explain":
            return explain(args)
    except DataError as err:
        print(f"dpcompile {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a DP refusal arrives wrapped in Dynamo's BackendCompilerFailed
        inner = _dp_error(err, DPCompileError)
        if inner is None:
            raise
        print(f"dpcompile {args.command}: refused by the DP pass: {type(inner).__name__}: {inner}", file=sys.stderr)
        return 3
    return 2


def _dp_error(err: BaseException, kind) -> Optional[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
