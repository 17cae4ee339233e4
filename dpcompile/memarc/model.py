"""`MemArcLM`: a transformed causal LM with a per-sample separable loss, and the DP entry points that check the
clipping style against what the transformation supports.

Every transformation in `dpcompile.memarc` returns a `MemArcLM`. Its forward is

    model(input_ids, targets)            -> mean over samples of (mean over the sample's tokens of cross-entropy)
    model(input_ids)                     -> logits (B, T, V)

`targets` are the next-token ids aligned with `input_ids` (targets[:, t] is the token after input_ids[:, t]);
positions with `ignore_index` (-100) are left out of their own sample's mean. Every normaliser is per sample, so
the loss is per-sample separable with `loss_reduction="mean"` (Hugging Face's own loss is a token mean over the
whole batch, a batch-wide normaliser that the flashdp pass refuses).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import DPCompileError, OptionsError
from ..hf import IGNORE_INDEX, disable_hub_kernels
from ..hf import per_sample_lm_loss as _per_sample_losses


def per_sample_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                       reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum, `reduction="sum"`) over samples of each sample's mean token cross-entropy (logits (B, T, V),
    targets (B, T), already aligned: no shift). The per-sample losses are dpcompile.hf.per_sample_lm_loss's: a
    sample whose targets are all `ignore_index` contributes 0; cross-entropy is taken in float32 at least."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: 'mean' or 'sum'")
    per_sample = _per_sample_losses(logits, targets, ignore_index=ignore_index, shift=False)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


#: clipping styles and what they cost per transformation; None = supported at no extra cost
_FLAT_KEEPS = ("clipping='flat': the clip factor of every sample needs the norms of all trainable sites, so each "
               "site's operands (its input and its output gradient) stay alive until the backward has reached the "
               "first layer")


class MemArcLM(nn.Module):
    """A Hugging Face causal LM after a memarc transformation (see the module docstring for forward)."""

    #: "full", "lora", "adapters", "side", "reversible"
    method = "full"
    #: how forward(input_ids, targets) combines the samples' losses; memarc.compile / make_private set it to their
    #: loss_reduction
    loss_reduction = "mean"

    def __init__(self, lm: nn.Module, trainable: Optional[list[str]] = None, info: Optional[dict] = None):
        super().__init__()
        self.lm = disable_hub_kernels(lm)  # hub kernels are opaque to the DP pass, and break checkpointing
        self.info = dict(info or {})
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        self._declared = sorted(names if trainable is None else trainable)

    # -- forward ------------------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.lm.get_output_embeddings()(h)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.logits(input_ids, attention_mask)
        if targets is None:
            return logits
        return per_sample_lm_loss(logits, targets, reduction=self.loss_reduction)

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def trainable_names(self) -> list[str]:
        """The parameters this transformation trains (all others are frozen)."""
        return list(self._declared)

    def num_parameters(self, trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    def clipping_cost(self, clipping) -> Optional[str]:
        """None if `clipping` costs nothing beyond the pass's usual work on this model, else a description of
        the cost. Raises DPCompileError if the style is refused (see `check_clipping`)."""
        if clipping == "flat":
            return _FLAT_KEEPS + "."
        return None

    def check_clipping(self, clipping, accept_flat_cost: bool = False) -> None:
        if clipping is None:
            raise OptionsError("dpcompile.memarc: the clipping style is an explicit choice here: pass clipping='flat', "
                               "'per_layer', 'per_param' or explicit groups")

    def check_trainable(self) -> None:
        """Refuses a model whose trainable parameters are not exactly those the transformation declared (a
        parameter unfrozen afterwards would be trained outside the method's memory design, or, in the side
        network's forward-only backbone, not at all)."""
        now = sorted(n for n, p in self.named_parameters() if p.requires_grad)
        if now != self._declared:
            extra = sorted(set(now) - set(self._declared))
            missing = sorted(set(self._declared) - set(now))
            raise DPCompileError(
                f"dpcompile.memarc ({self.method}): the trainable parameters changed after the transformation: "
                f"unexpectedly trainable {extra[:6]}{' ...' if len(extra) > 6 else ''}, frozen "
                f"{missing[:6]}{' ...' if len(missing) > 6 else ''}. Build the model again with the options you "
                "want instead of changing requires_grad by hand")

    def extra_repr(self) -> str:
        n, t = self.num_parameters(), self.num_parameters(trainable=True)
        return f"method={self.method}, trainable={t:,} of {n:,} parameters ({100 * t / max(n, 1):.3f}%), {self.info}"


def compile(model: MemArcLM, *, clipping, max_grad_norm, loss_reduction: str = "mean", accept_flat_cost: bool = False,
            backend: str = "flashdp", **options):
    """`dpcompile.compile` for a memarc model, with the clipping style an explicit (keyword-only, no default)
    choice checked against the transformation. Returns a `dpcompile.DPCompiled`; call it as `model(ids, targets)`.
    Sets `model.loss_reduction = loss_reduction`, so that the model's loss is the mean or the sum over samples as
    the backend is told.
    """
    model.check_trainable()
    model.check_clipping(clipping, accept_flat_cost=accept_flat_cost)
    model.loss_reduction = loss_reduction
    from ..compile import compile as dp_compile

    return dp_compile(model, backend=backend, max_grad_norm=max_grad_norm, clipping=clipping,
                      loss_reduction=loss_reduction, **options)


def make_private(model: MemArcLM, optimizer: torch.optim.Optimizer, data_loader, *, clipping, max_grad_norm,
                 accept_flat_cost: bool = False, **kwargs):
    """`dpcompile.make_private` for a memarc model (clipping explicit and checked, as in `compile`). The optimizer
    should hold only `model`'s trainable parameters (frozen ones never get a gradient)."""
    model.check_trainable()
    model.check_clipping(clipping, accept_flat_cost=accept_flat_cost)
    model.loss_reduction = kwargs.get("loss_reduction", "mean")
    from ..privacy import make_private as dp_make_private

    return dp_make_private(model, optimizer, data_loader, clipping=clipping, max_grad_norm=max_grad_norm, **kwargs)


def freeze_all(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def default_std(lm: nn.Module) -> float:
    return float(getattr(lm.config, "initializer_range", 0.02) or 0.02)


def kaiming_like_linear_(w: torch.Tensor) -> None:
    """nn.Linear's default weight init (what LoRA implementations use for A)."""
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
