"""What the `dpcompile` command (cli.py: its options, `explain`) and the stages of `dpcompile train`
(train_run.py) both use: the usage error, the log line, the check of --strategy, the freezing of --train-layers.
Imports neither of them."""
from __future__ import annotations

import sys
from typing import Optional

from .errors import OptionsError
from .options import EXACT_LINEAR_STRATEGIES, DPOptions
from .strategy_registry import ACCOUNTING_DOCS, find_strategy

_EXACT = ", ".join(EXACT_LINEAR_STRATEGIES)


class UsageError(Exception):
    """A bad option, or a combination that cannot run: `dpcompile` prints the message and exits with status 2."""


def _log(msg: str) -> None:
    print(f"[dpcompile] {msg}", file=sys.stderr, flush=True)


def _strategy_option(strategy: Optional[str]) -> dict:
    """{"strategy": s} if this dpcompile's options know the key (the planner adds it), {} for the default."""
    if strategy in (None, "", "auto"):
        return {}
    record = find_strategy(strategy)
    if record is not None and not record.exact:  # its own accounting (the strategy registry says which)
        raise UsageError(f"--strategy {strategy} estimates per-sample norms instead of computing them exactly, "
                         f"which changes the privacy analysis ({record.accounting} accounting, "
                         f"{ACCOUNTING_DOCS.get(record.accounting, 'docs/clipping.md')}); `dpcompile train` "
                         f"calibrates sigma for exact norms only. Use one of {_EXACT} here, or the Python API for "
                         f"{strategy} norms")

    try:
        DPOptions.parse({"strategy": strategy})
    except OptionsError as err:
        if "unknown" in str(err):
            raise UsageError(f"--strategy {strategy}: this version of dpcompile has no strategy option "
                             "(the planner chooses every site's strategy itself)") from None
        raise UsageError(f"--strategy {strategy}: {err}") from None
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
            raise UsageError("--train-layers: found no list of transformer blocks in this model")
        if train_layers > len(blocks):
            raise UsageError(f"--train-layers {train_layers}: the model has only {len(blocks)} blocks")
        for b in list(blocks)[:len(blocks) - train_layers]:
            b.requires_grad_(False)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
