"""The settings of a `dpcompile train` run (train_run.py's stages pass them along): the records the stages fill in
(Setup, Model, Data, Privacy), and how the command line (or a resumed run's record) becomes the run's settings, its
output directory and its planned steps."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .cli_common import UsageError
from .privacy.accounting import PrivacyAccountant


@dataclass
class Setup:
    """What the command line (or the resumed checkpoint) settles before anything is loaded."""
    args: argparse.Namespace
    run: dict  # the settings that define the run (cli.RUN_OPTIONS, ...; steps and sigma are added by the plan)
    resumed: Optional[dict]  # the dpcompile checkpoint of --resume
    device: torch.device
    out_dir: Optional[Path]  # None: --no-save
    t_start: float
    profiles: dict  # the defaults by device type (cli.PROFILES): --steps / --epochs are planned with them

    @property
    def private(self) -> bool:
        return not self.run["no_dp"]

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def extra(self) -> dict:
        """The run record of the resumed checkpoint ({} for a new run)."""
        return self.resumed["extra"] if self.resumed is not None else {}


@dataclass
class Model:
    model: Any
    tok: Any
    n_train: int  # trainable parameters


@dataclass
class Data:
    corpus: Any
    windows: torch.Tensor  # training windows
    held: Optional[torch.Tensor]  # held-out windows (None: no perplexity)
    N: int  # training windows
    B: int  # expected logical batch size
    micro: int  # physical micro-batch size
    q: float  # sample rate
    steps_done: int  # steps of the resumed run so far
    steps: int  # steps of the whole run


@dataclass
class Privacy:
    prior: Optional[dict]  # the accountant state of the earlier history
    prior_from: Optional[str]  # where it is recorded
    accountant: PrivacyAccountant
    prior_eps: PrivacyAccountant  # the earlier history alone
    eps_prior: float
    sigma: Optional[float]
    recalibrated: bool  # a resumed run's sigma calibrated again (a new --epsilon or more steps)

# ---- the run's settings ---------------------------------------------------------------------------------------

def _out_dir(args: argparse.Namespace) -> Optional[Path]:
    if args.no_save:
        return None
    out_dir = Path(args.out or (args.resume if args.resume else "dpcompile-out"))
    same = args.resume and out_dir.resolve() == Path(args.resume).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a directory")
    if not same and not _dir_is_empty(out_dir) and not args.overwrite:
        raise UsageError(f"--out {out_dir} is not empty: pass --overwrite to write into it (its files of the same "
                         "names are replaced), or another --out")
    return out_dir


def _resolve_run(args: argparse.Namespace, explicit: set, resumed: Optional[dict], profiles: dict,
                 run_options: Sequence[str]) -> dict:
    """The settings that define the run: the command line's (device defaults filled in), or a resumed run's."""
    device = _resolve_device(args.device)
    private = not args.no_dp and not (args.sigma is None and math.isinf(args.epsilon))
    prof = device_profile(profiles, device.type, private)
    if resumed is not None:
        run = dict(resumed["extra"]["run"])
        if "epsilon" in explicit and args.epsilon != run.get("epsilon"):
            if run.get("epsilon") is None:
                raise UsageError(f"--resume {args.resume}: that run has no target epsilon (it ran with "
                                 f"{'--no-dp' if run.get('no_dp') else '--sigma'}): --epsilon cannot be given")
            run["epsilon"] = args.epsilon  # a new target for the whole run (more steps): sigma is recalibrated
        for key in run_options:
            if key == "backend" and args.backend == "auto" or key == "epsilon":
                continue
            if key in explicit and getattr(args, key) != run.get(key):
                given = getattr(args, key)
                raise UsageError(
                    f"--resume continues the run as it was set up; --{key.replace('_', '-')} {given} differs from "
                    f"its {run.get(key)!r}. To train further with other settings, start a new run from the "
                    f"checkpoint: --model {args.resume} (its privacy history continues)")
        run["device"] = str(device)
        return run
    B = args.batch_size or prof["batch_size"]
    return {
        "model": args.model, "data": args.data, "encoding": args.encoding,
        "seq_len": args.seq_len or prof["seq_len"], "max_windows": args.max_windows, "batch_size": B,
        "micro_batch_size": args.micro_batch_size or min(prof["micro_batch_size"], B),
        "lr": args.lr or prof["lr"], "weight_decay": args.weight_decay,
        "clipping": args.clipping or prof["clipping"],
        "clip_fn": args.clip_fn, "max_grad_norm": args.max_grad_norm, "strategy": args.strategy,
        "adaptive_clipping": _adaptive_run_options(args),
        "train_layers": args.train_layers if args.train_layers is not None else prof["train_layers"],
        "train_embeddings": args.train_embeddings,
        "backend": args.backend if args.backend != "auto" else ("flashdp" if device.type == "cuda"
                                                                else "flashdp_eager"),
        "seed": args.seed, "secure_mode": args.secure_mode, "delta": args.delta,
        "epsilon": args.epsilon if private and args.sigma is None else None, "sigma": args.sigma,
        "no_dp": not private, "device": str(device),
        "eval_windows": args.eval_windows if args.eval_windows is not None else prof["eval_windows"],
    }


def _adaptive_run_options(args) -> Optional[dict]:
    """The adaptive clipping options of a run (None unless --max-grad-norm adaptive)."""
    given = {"target_quantile": args.target_quantile, "clip_learning_rate": args.clip_learning_rate,
             "quantile_noise_std": args.quantile_noise_std}
    if args.max_grad_norm != "adaptive":
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise UsageError(f"--{named[0].replace('_', '-')} is an option of adaptive clipping: pass "
                             "--max-grad-norm adaptive with it")
        return None
    return {k: v for k, v in given.items() if v is not None}


def _resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return dev


def _dir_is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def device_profile(profiles: dict, device_type: str, private: bool) -> dict:
    """The defaults of a run on `device_type` (cli.PROFILES): a profile's "no_dp" entries replace its own in a
    non-private run (each mode gets its own best measured recipe)."""
    prof = dict(profiles["cuda" if device_type == "cuda" else "cpu"])
    overrides = prof.pop("no_dp", {})
    return prof if private else {**prof, **overrides}


def _planned_steps(args: argparse.Namespace, q: float, device_type: str, profiles: dict,
                   private: bool) -> int:
    prof = device_profile(profiles, device_type, private)
    if args.steps is not None:
        return args.steps
    if args.epochs is not None or prof["steps"] is None:
        return max(1, math.ceil((args.epochs or prof.get("epochs", 1.0)) / q))
    return prof["steps"]
