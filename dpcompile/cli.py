"""The `dpcompile` command: `train` (DP fine-tuning of a causal LM on text), `explain` (the per-parameter plan),
`bench` (runs the benchmark harness, benchmarks/harness.py, of a source checkout).

    dpcompile train                                   # SmolLM2-135M on Shakespeare, epsilon = 8, CPU or GPU
    dpcompile train --epsilon 3 --out runs/eps3
    dpcompile train --model tiny-llama --data zen --seq-len 32 --max-windows 8 --steps 4 --save-every 2 --out runs/smoke
    dpcompile train --resume runs/smoke --steps 8 --epsilon 12       # 4 more steps; epsilon 12 for all 8
    dpcompile explain smollm2-135m --train-layers 1 --seq-len 32
    dpcompile bench --help

Exit status: 0 done, 2 a bad option or missing input (the message names the option), 3 the DP pass refused the
model, 130 interrupted (the last finished step is saved: --resume continues), 1 anything else (a bug: please report).
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from . import train_run as T
from .cli_common import _EXACT, UsageError, _log, _strategy_option, freeze
from .cli_common import decoder_blocks  # noqa: F401  (cli.decoder_blocks, as before)
from .train_run import perplexity, write_curve  # noqa: F401  (cli.perplexity, cli.write_curve, as before)

# the sample's prompt: in the Gutenberg plays' own layout (speaker line, then the speech), so that a model that
# learnt the corpus can show it (docs/results.md: the samples of four prompts, before and after)
DEFAULT_SAMPLE_PROMPT = "HAMLET.\nTo be, or not to be,"

#: defaults that depend on the device: a CPU run finishes in minutes, a GPU run trains the whole model on the corpus.
#: Both recipes were chosen by measurement (docs/results.md, benchmarks/cpu_recipe_search.py). CPU: short windows
#: give more examples per second of compute, and a large expected batch is what lets the clipped signal stand out
#: of the noise; the last 2 blocks at lr 2e-3 recovered the most of the non-private gain in the time. GPU: flat
#: clipping keeps the layers' relative scales, and DP-SGD gains from 6 epochs where the non-private run overfits
#: (its own best: 3 epochs at lr 1.5e-4): "no_dp" holds what --no-dp changes, so each mode runs its best measured
#: recipe.
PROFILES = {
    "cpu": dict(seq_len=32, batch_size=128, micro_batch_size=64, steps=12, train_layers=2, eval_windows=96, lr=2e-3,
                clipping="per_layer"),
    # windows of 64 tokens: 4x the examples of 256-token windows, so at the same sampling rate and steps (the same
    # sigma for the same epsilon) a step averages 4x the samples and the noise weighs 4x less (docs/results.md,
    # GPU); 2048 held-out windows hold as many tokens as 512 of 256
    "cuda": dict(seq_len=64, batch_size=1024, micro_batch_size=128, steps=None, epochs=6.0, train_layers=None,
                 eval_windows=2048, lr=7e-4, clipping="flat", no_dp=dict(epochs=3.0, lr=1.5e-4)),
}

#: exit statuses (docs/cli.md, docs/errors.md)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: options that define a run's trajectory: `--resume` takes them from the checkpoint (given again, they must agree)
RUN_OPTIONS = ("model", "data", "encoding", "seq_len", "max_windows", "batch_size", "micro_batch_size", "lr",
               "weight_decay", "clipping", "clip_fn", "max_grad_norm", "strategy", "train_layers", "train_embeddings",
               "backend", "seed", "secure_mode", "delta", "epsilon", "sigma", "no_dp", "eval_windows")


TRAIN_EXAMPLES = """examples:
  dpcompile train --model tiny-llama --data zen --seq-len 32 --max-windows 8 --steps 4 --save-every 2 --out runs/smoke
  dpcompile train --resume runs/smoke --steps 8 --epsilon 12       # 4 more steps; epsilon 12 for all 8
  dpcompile train --model runs/smoke --data zen --seq-len 32 --max-windows 8 --steps 4 --epsilon 16 --out runs/smoke2
      (a new run on the trained model: its DP history continues, epsilon 16 for both runs together)

exit status: 0 done, 2 a bad option or missing input, 3 the DP pass refused the model, 130 interrupted (Ctrl-C
stops after the current step and saves it: --resume continues), 1 anything else (a bug: please report it)
"""


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


def _max_grad_norm(s: str):
    """--max-grad-norm: a positive number, or "adaptive" (adaptive clipping)."""
    if s == "adaptive":
        return s
    return _positive(float)(s)


def _seq_len(s: str) -> int:
    v = _positive(int)(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {s!r}: a window of one token has no next token to "
                                         "predict")
    return v


def _float(s: str, ok, requirement: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {s!r}")
    return v


def _epsilon(s: str) -> float:
    return _float(s, lambda v: v > 0, "> 0 (or inf for no privacy)")


def _delta(s: str) -> float:
    return _float(s, lambda v: 0 < v < 1, "in (0, 1)")


def _add_model_options(p: argparse.ArgumentParser, train_layers_default: str, clipping_default: Optional[str] = None,
                       clipping_default_text: str = "per_layer") -> None:
    """clipping_default: None where the device profile decides (train: cli.PROFILES); clipping_default_text says
    what the default is."""
    p.add_argument("--clipping", default=clipping_default, choices=["flat", "per_layer", "per_param"],
                   help=f"clipping groups (default {clipping_default_text}; every style bounds the whole per-sample "
                        "norm by C)")
    p.add_argument("--clip-fn", default="abadi", choices=["abadi", "automatic"],
                   help="min(1, C/|g|) (abadi, the default) or C/(|g|+0.01) (automatic)")
    p.add_argument("--max-grad-norm", type=_max_grad_norm, default=1.0, metavar="C",
                   help="per-sample gradient norm bound C (default 1.0), or 'adaptive': each clipping group's bound "
                        "follows a quantile of its per-sample norms, estimated privately every step (Andrew et al. "
                        "2021; --target-quantile, --clip-learning-rate; docs/privacy.md)")
    p.add_argument("--strategy", default=None,
                   help=f"strategy of linear weight sites: auto (the planner's cheapest, the default) or one of "
                        f"{_EXACT} (the backend option 'strategy'; see docs/clipping.md)")
    p.add_argument("--train-layers", type=int, default=None, metavar="N",
                   help="train only the last N transformer blocks (and the final norm); -1 = all. Default: "
                        + train_layers_default)
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

    _add_train_parser(sub)
    _add_explain_parser(sub)
    sub.add_parser("bench", help="run benchmarks/harness.py of a source checkout (arguments are passed on; try "
                                 "`dpcompile bench --help`)",
                   add_help=False)
    return ap


def _add_train_parser(sub) -> None:
    """`dpcompile train` and its options."""
    cpu, gpu = PROFILES["cpu"], PROFILES["cuda"]
    t = sub.add_parser("train", help="DP fine-tune a causal LM on a text corpus",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES,
                       description=textwrap.fill(
                           "DP fine-tuning (DP-SGD with Poisson sampling, per-sample clipping in the compiled graph, "
                           "Gaussian noise, PLD accounting) of a causal LM on text. With no options: SmolLM2-135M "
                           "on Shakespeare at epsilon=8, delta=1e-5; on a CPU a short demonstration run, on a GPU "
                           f"{gpu['epochs']:g} epochs of the whole model ({gpu['no_dp']['epochs']:g} with --no-dp). "
                           "A model whose directory records earlier DP training (dp_checkpoint.pt / dp_report.json) "
                           "continues that privacy history: epsilon and --epsilon are totals.", 100))
    t.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (the default) | tiny-llama | tiny-gpt2 | a .gguf file | a save_pretrained "
                        "directory, e.g. an earlier run's --out (its DP history continues)")
    t.add_argument("--data", default="shakespeare",
                   help="shakespeare (the default) | zen | a text file | a directory of .txt files")
    t.add_argument("--encoding", default="utf-8",
                   help="text encoding of --data files, decoded strictly (default utf-8; e.g. latin-1)")
    _add_privacy_options(t)
    t.add_argument("--epochs", type=_positive(float), default=None,
                   help="passes over the training windows (in expectation); default: --steps on CPU; on a GPU "
                        f"{gpu['epochs']:g}, or {gpu['no_dp']['epochs']:g} with --no-dp")
    t.add_argument("--steps", type=_positive(int), default=None,
                   help=f"logical (Poisson) batches of the whole run, overriding --epochs (default {cpu['steps']} "
                        "on CPU). With --resume: the new total (more steps extend the run)")
    t.add_argument("--batch-size", type=_positive(int), default=None,
                   help=f"expected logical batch size (Poisson); default {cpu['batch_size']} on CPU, "
                        f"{gpu['batch_size']} on a GPU")
    t.add_argument("--micro-batch-size", type=_positive(int), default=None,
                   help=f"physical micro-batch size (memory); default {cpu['micro_batch_size']} on CPU, "
                        f"{gpu['micro_batch_size']} on a GPU")
    t.add_argument("--seq-len", type=_seq_len, default=None,
                   help=f"tokens per example window (>= 2; DP protects each window); default {cpu['seq_len']} on CPU, "
                        f"{gpu['seq_len']} on a GPU")
    t.add_argument("--max-windows", type=_positive(int), default=None,
                   help="use only the first N training windows (N is what the accountant sees)")
    t.add_argument("--lr", type=_positive(float), default=None,
                   help=f"AdamW learning rate (default {cpu['lr']:g} on CPU; on a GPU {gpu['lr']:g}, or "
                        f"{gpu['no_dp']['lr']:g} with --no-dp)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--eval-windows", type=int, default=None,
                   help=f"held-out windows for perplexity before and after (0: skip); default {cpu['eval_windows']} on "
                        f"CPU, {gpu['eval_windows']} on a GPU")
    _add_model_options(t, "2 on CPU, all on a GPU", clipping_default_text="per_layer on CPU, flat on a GPU")
    t.add_argument("--backend", default="auto", choices=["auto", "flashdp", "flashdp_eager"],
                   help="auto (the default): flashdp (Inductor + Triton kernels) on a GPU, flashdp_eager on CPU")
    t.add_argument("--device", default="auto", help="auto (the default) | cpu | cuda | cuda:N")
    t.add_argument("--seed", type=int, default=0, help="seed of the sampling, the noise and torch (default 0)")
    t.add_argument("--secure-mode", action="store_true",
                   help="OS-random sampling and noise (no reproducibility; see docs/privacy.md)")
    t.add_argument("--out", default=None,
                   help="output directory: transformers checkpoint, tokenizer, dp_checkpoint.pt, dp_report.json, "
                        "curve.csv, curve.png (default dpcompile-out; with --resume, the resumed directory). It must "
                        "be empty or new unless --overwrite")
    t.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (files are replaced)")
    t.add_argument("--save-every", type=_positive(int), default=None, metavar="N",
                   help="also write the checkpoint every N steps (it is always written at the end)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (an --out of dpcompile train): same settings, "
                        "same batches and noise as if it had not stopped")
    t.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    t.add_argument("--sample", default=DEFAULT_SAMPLE_PROMPT,
                   help=f"prompt for a short generate() at the end ('' to skip; default {DEFAULT_SAMPLE_PROMPT!r}, a "
                        "speech opening as the corpus writes it: speaker line first)")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def _add_privacy_options(t: argparse.ArgumentParser) -> None:
    """`dpcompile train`: the privacy target (or sigma, or none), delta, adaptive clipping, --allow-overspend."""
    priv = t.add_mutually_exclusive_group()
    priv.add_argument("--epsilon", type=_epsilon, default=8.0,
                      help="target epsilon of the whole privacy history, this run and any earlier one the model "
                           "records; sigma is calibrated to it (default 8; inf: no privacy)")
    priv.add_argument("--sigma", type=_positive(float), default=None,
                      help="noise multiplier instead of a target epsilon (epsilon is then reported)")
    priv.add_argument("--no-dp", action="store_true",
                      help="non-private baseline: same sampling, optimizer and compiler (torch.compile with inductor on "
                           "a GPU, aot_eager on CPU, as the DP run's backend), no clipping, no noise")
    t.add_argument("--delta", type=_delta, default=1e-5, help="target delta (default 1e-5)")
    t.add_argument("--target-quantile", type=_delta, default=None,
                   help="--max-grad-norm adaptive: the fraction of samples meant to be within the bound (default 0.5)")
    t.add_argument("--clip-learning-rate", type=_positive(float), default=None,
                   help="--max-grad-norm adaptive: the bound's geometric learning rate (default 0.2)")
    t.add_argument("--quantile-noise-std", type=_positive(float), default=None,
                   help="--max-grad-norm adaptive: noise of the quantile count (default expected batch / 20); "
                        "epsilon covers it (the gradient noise is raised to keep the target)")
    t.add_argument("--allow-overspend", action="store_true",
                   help="train even when the model's earlier DP history already spends --epsilon (epsilon then "
                        "reports the true total, above the target)")


def _add_explain_parser(sub) -> None:
    """`dpcompile explain` and its options."""
    e = sub.add_parser("explain", help="the per-parameter DP plan of a model (group, site, strategy, cost)")
    e.add_argument("model", nargs="?", default="smollm2-135m",
                   help="smollm2-135m (the default) | tiny-llama | tiny-gpt2 | a .gguf file | a save_pretrained "
                        "directory")
    e.add_argument("--seq-len", type=_seq_len, default=64, help="example length (default 64)")
    e.add_argument("--batch-size", type=_positive(int), default=2, help="batch size of the example input (>= 2; "
                                                                         "default 2)")
    _add_model_options(e, "all", clipping_default="per_layer")


def _explicit_options(argv: Sequence[str]) -> set:
    """The dests of the options given on the command line (not left at their defaults)."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for parser in sub.choices.values():
        for a in parser._actions:
            a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"command"}


# ---- train ----------------------------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> dict:
    """`dpcompile train`: its stages, in order (each a function of dpcompile/train_run.py). Returns the report."""
    setup = T.resolve(args, PROFILES, RUN_OPTIONS)  # the run's settings (a resumed run's), --out checked, torch seeded
    model = T.load_model(setup)  # model + tokenizer on the device, frozen but the trained blocks
    prior, prior_from = T.prior_history(setup)  # the DP history the model (or the resumed run) records
    data = T.load_data(setup, model.tok)  # the corpus's training and held-out windows, the planned steps
    privacy = T.plan_privacy(setup, data, prior, prior_from)  # the accountant, sigma for the target (total)
    run = T.build(setup, model, data, privacy)  # perplexity before, loader, optimizer, the compiled loss
    run.restore_and_plan()  # --resume: the checkpoint's optimizer, sampler and RNG; the privacy plan
    done, train_s = run.train_loop()  # progress, --save-every checkpoints, Ctrl-C (saved, then exit 130)
    report, ppl_after, eps_spent = T.finish(run, done)  # perplexity after, the sample, the final save
    T.print_summary(run, report, train_s, ppl_after, eps_spent)
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
    args = parser.parse_args(argv)  # a bad option: argparse prints usage and exits with status 2
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .data import DataError
    from .errors import DPCompileError

    try:
        if args.command == "train":
            args.argv = argv
            args.explicit = _explicit_options(argv)
            train(args)
            return EXIT_OK
        if args.command == "explain":
            return explain(args)
    except (DataError, UsageError) as err:
        print(f"dpcompile {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dpcompile {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - a DP refusal arrives wrapped in Dynamo's BackendCompilerFailed
        inner = _dp_error(err, DPCompileError)
        if inner is None:
            raise
        print(f"dpcompile {args.command}: refused by the DP pass: {type(inner).__name__}: {inner}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_USAGE


def _dp_error(err: BaseException, kind) -> Optional[BaseException]:
    """The `kind` error among err's causes (Dynamo wraps backend errors), or None."""
    from .compile import _caused_by

    return _caused_by(err, kind)


if __name__ == "__main__":
    sys.exit(main())
