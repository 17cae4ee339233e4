"""What `dpcompile train` writes and reads besides the model (train_run.py's stages call these): the report and
curve files (dp_report.json, curve.csv, curve.png), the run record a --resume reads back, the held-out perplexity,
and the first step's seconds that the next run's forecast quotes."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as D
from .cli_common import UsageError, _log
from .hf import DP_CHECKPOINT_NAME
from .train_setup import Setup

#: files `dpcompile train` writes into --out (besides the transformers checkpoint)
REPORT_NAME, CURVE_CSV, CURVE_PNG = "dp_report.json", "curve.csv", "curve.png"
RUN_FORMAT = "dpcompile.train"


# ---- the run record (--resume reads it back) ------------------------------------------------------------------

def _read_run(resume: str) -> dict:
    """The dpcompile checkpoint of a `dpcompile train` output directory (torch.load, weights_only)."""
    path = Path(resume) / DP_CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no {DP_CHECKPOINT_NAME} there; give the --out directory of an earlier "
                         "`dpcompile train` run that saved a checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    extra = state.get("extra") if isinstance(state, dict) else None
    if not isinstance(extra, dict) or extra.get("format") != RUN_FORMAT:
        raise UsageError(f"--resume {resume}: {path} was not written by `dpcompile train` (a DPTrainer checkpoint "
                         "resumes with trainer.train(resume_from_checkpoint=...))")
    return state


# ---- the held-out perplexity ----------------------------------------------------------------------------------

def perplexity(model, windows, micro_batch_size: int, device, autocast=None, desc: str = "eval",
               progress: bool = True) -> float:
    """exp(mean next-token cross-entropy) over all tokens of the held-out windows."""
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


# ---- dp_report.json and the curve -----------------------------------------------------------------------------

def write_curve(out_dir: Path, rows: list, title: str = "") -> Optional[Path]:
    """curve.csv (step, loss, epsilon, examples, tokens, seconds) and, when matplotlib is installed, curve.png
    (loss and epsilon against the step). Returns the PNG's path, None when it was skipped."""
    out_dir = Path(out_dir)
    fields = ["step", "loss", "epsilon", "examples", "tokens", "seconds"]
    with open(out_dir / CURVE_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and not math.isfinite(r[k]))
                            else r[k]) for k in fields})
    try:
        import matplotlib
    except ImportError:
        _log(f"matplotlib is not installed: {CURVE_PNG} skipped ({CURVE_CSV} has the numbers; "
             "pip install matplotlib to get the plot)")
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    a.set_xlabel("step")
    a.set_ylabel("training loss (not private)")
    eps = [r.get("epsilon") for r in rows]
    if any(e is not None and math.isfinite(e) for e in eps):
        b.plot(steps, [e if e is not None and math.isfinite(e) else float("nan") for e in eps], color="C1")
    b.set_xlabel("step")
    b.set_ylabel("epsilon spent (total)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / CURVE_PNG, dpi=100)
    plt.close(fig)
    return out_dir / CURVE_PNG


def _json_safe(obj):
    """Strict JSON: non-finite floats (a perplexity not measured, epsilon = inf) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---- how long the first (compiling) step takes ------------------------------------------------------------------

#: the first step's seconds of earlier runs on this machine, by _first_step_key (a JSON file in the data directory)
FIRST_STEP_FILE = "first_step_seconds.json"


def _first_step_key(s: Setup) -> str:
    """What the compile time depends on: model, device, backend, torch, the trained blocks, private or not."""
    dev = s.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    run = s.run
    return (f"{run['model']}|{name}|{run['backend'] if s.private else 'no-dp ' + run['backend']}|torch "
            f"{torch.__version__}|train_layers {run['train_layers']}|{run['clipping']}")


def _first_step_records() -> dict:
    try:
        return json.loads((D.data_dir() / FIRST_STEP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def first_step_forecast(s: Setup) -> str:
    """The log line before training: how long the first step (which compiles the model) took the last time the
    model was trained here the same way, or what it takes elsewhere when this machine has no record."""
    last = _first_step_records().get(_first_step_key(s))
    if last is not None:
        return (f"the first step compiles the model: {last:.0f} s the last time on this machine (less when "
                "Inductor's caches hold the graphs already)")
    if s.device.type == "cuda":
        return ("the first step compiles the model (Dynamo + the DP pass + Inductor): SmolLM2-135M took 4.2 min on "
                "an H100 with empty caches, under a minute with Inductor's caches of an earlier run (docs/results.md)")
    return "the first step compiles the model (Dynamo + the DP pass): on a CPU this takes a few minutes"


def record_first_step(s: Setup, seconds: float) -> None:
    """Remember the first step's seconds for the next run's forecast (best effort: a read-only data directory
    is no error)."""
    records = _first_step_records()
    records[_first_step_key(s)] = round(seconds, 1)
    try:
        D.data_dir().mkdir(parents=True, exist_ok=True)
        (D.data_dir() / FIRST_STEP_FILE).write_text(json.dumps(records, indent=1) + "\n")
    except OSError:
        pass
