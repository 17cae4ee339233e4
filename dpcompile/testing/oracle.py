"""Independent reference implementations (test oracles) of the DP-SGD clipped-gradient contract.

Contract: after backward every trainable parameter p holds

    p.grad = sum_i c_{g(p), i} * g_i[p]

where g_i is the gradient of sample i's loss l_i (the per-sample gradient), g(p) is p's clipping
group and, with ||g_{g,i}|| the L2 norm of sample i's gradient over all parameters of group g,

    abadi:     c_{g,i} = min(1, C_g / (||g_{g,i}|| + CLIP_EPS))
    automatic: c_{g,i} = C_g / (||g_{g,i}|| + AUTO_GAMMA)

The oracles always return the clipped SUM over samples. Everything here is plain PyTorch (a Python
loop over samples, or torch.func.vmap(grad)) and shares no code with the compiler.

A loss function is called as `loss_fn(model, *batch)` and returns a scalar that is a SUM over the
samples of `batch` of per-sample losses (so on a one-sample batch it returns l_i). `batch` is a
tuple of tensors whose dim 0 indexes samples.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpcompile.options import AUTO_GAMMA, CLIP_EPS

LossFn = Callable[..., torch.Tensor]
Grads = dict[str, torch.Tensor]
CLIP_FNS = ("abadi", "automatic")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() removes duplicates: a tied parameter appears once, under its first name.
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _prepare(model: nn.Module, batch: Sequence[torch.Tensor], dtype: torch.dtype):
    """Deep copy of `model` in `dtype`, the batch with float tensors cast to `dtype`, and B."""
    batch = tuple(batch)
    if not batch:
        raise ValueError("batch must hold at least one tensor")
    sizes = {t.shape[0] for t in batch}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size (dim 0): {sorted(sizes)}")
    m = copy.deepcopy(model).to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    return m, batch, sizes.pop()


def _zeros(named, B: int, dtype: torch.dtype) -> Grads:
    return {n: torch.zeros(B, *p.shape, dtype=dtype, device=p.device) for n, p in named}


def per_sample_grads_loop(model: nn.Module, loss_fn: LossFn, batch: Sequence[torch.Tensor], *,
                          dtype: torch.dtype = torch.float64) -> Grads:
    """Per-sample gradients {name: (B, *p.shape)} by one forward+backward per sample.

    Runs `loss_fn(copy, *[t[i:i+1] for t in batch])` on a deep copy of `model` cast to `dtype`
    (float batch tensors cast too, integer ones kept). Only trainable parameters are returned,
    keyed by their `named_parameters()` name; parameters that get no gradient get zeros.
    """
    m, batch, B = _prepare(model, batch, dtype)
    named = _trainable(m)
    out = _zeros(named, B, dtype)
    params = [p for _, p in named]
    for i in range(B):
        loss = loss_fn(m, *(t[i:i + 1] for t in batch))
        if not params or not loss.requires_grad:
            continue
        for (n, _), g in zip(named, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                out[n][i] = g
    return out


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) as one module so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, *batch)


def per_sample_grads_vmap(model: nn.Module, loss_fn: LossFn, batch: Sequence[torch.Tensor], *,
                          dtype: torch.dtype = torch.float64) -> Grads:
    """Same result as `per_sample_grads_loop`, via functional_call + vmap(grad).

    Each sample is given to `loss_fn` as a batch of one (unsqueezed inside the vmapped function).
    Tied parameters are passed once (first name) and re-tied by `tie_weights=True`. May raise for
    models vmap cannot trace (e.g. data-dependent Python control flow).
    """
    m, batch, B = _prepare(model, batch, dtype)
    named = _trainable(m)
    if B == 0 or not named:
        return _zeros(named, B, dtype)
    wrapper = _LossModule(m, loss_fn)
    params = {"model." + n: p.detach() for n, p in named}

    def sample_loss(params, *sample):
        return functional_call(wrapper, params, tuple(t.unsqueeze(0) for t in sample), tie_weights=True)

    with warnings.catch_warnings():  # vmap's slow-fallback notices (e.g. for CPU SDPA) are noise here
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(sample_loss), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    return {n: grads["model." + n] for n, _ in named}


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    """(B,) squared L2 norms of the per-sample slices of g (B, *shape)."""
    g = g.pow(2)
    return g.flatten(1).sum(1) if g.dim() > 1 else g


def clipped_sum(per_sample: Grads, groups: Sequence[Sequence[str]], thresholds: Sequence[float],
                clip_fn: str) -> Grads:
    """sum_i c_{g(p),i} * per_sample[p][i] for every parameter p of `per_sample`.

    `groups` must partition the names of `per_sample` (ValueError for a name in no group, in two
    groups, or unknown); `thresholds[k]` is C_k of `groups[k]`; clip_fn is "abadi" or "automatic".
    """
    if clip_fn not in CLIP_FNS:
        raise ValueError(f"clip_fn={clip_fn!r}; choose one of {CLIP_FNS}")
    if len(thresholds) != len(groups):
        raise ValueError(f"{len(thresholds)} thresholds for {len(groups)} groups")
    owner: dict[str, int] = {}
    for k, group in enumerate(groups):
        for n in group:
            if n not in per_sample:
                raise ValueError(f"group {k} names {n!r}, which is not a trainable parameter")
            if n in owner:
                raise ValueError(f"parameter {n!r} is in two groups ({owner[n]} and {k})")
            owner[n] = k
    missing = [n for n in per_sample if n not in owner]
    if missing:
        raise ValueError(f"parameters in no clipping group: {missing}")
    out: Grads = {}
    for k, group in enumerate(groups):
        if not group:
            continue
        norm = sum(_sq_norms(per_sample[n]) for n in group).sqrt()
        C = float(thresholds[k])
        c = (C / (norm + CLIP_EPS)).clamp(max=1.0) if clip_fn == "abadi" else C / (norm + AUTO_GAMMA)
        for n in group:
            out[n] = torch.einsum("b,b...->...", c.to(per_sample[n].dtype), per_sample[n])
    return {n: out[n] for n in per_sample}


def default_groups(model: nn.Module, clipping: str) -> list[list[str]]:
    """Clipping groups of the trainable parameters, in named_parameters() order.

    flat: one group; per_param: one group per parameter; per_layer: one group per owning module
    (the name minus its last dotted component, "" for top-level parameters), ordered by first use.
    """
    names = [n for n, _ in _trainable(model)]
    if clipping == "flat":
        return [names] if names else []
    if clipping == "per_param":
        return [[n] for n in names]
    if clipping == "per_layer":
        layers: dict[str, list[str]] = {}
        for n in names:
            layers.setdefault(n.rpartition(".")[0], []).append(n)
        return list(layers.values())
    raise ValueError(f"clipping={clipping!r}; choose 'flat', 'per_layer' or 'per_param'")


def default_thresholds(max_grad_norm: float, n_groups: int) -> list[float]:
    """[C / sqrt(G)] * G: the per-group thresholds whose total bound is C."""
    return [max_grad_norm / math.sqrt(n_groups)] * n_groups


def reference_clipped_grads(model: nn.Module, loss_fn: LossFn, batch: Sequence[torch.Tensor], *,
                            max_grad_norm: float,
                            clipping: Union[str, Sequence[Sequence[str]]] = "flat",
                            clip_fn: str = "abadi", oracle: str = "loop",
                            thresholds: Sequence[float] | None = None) -> Grads:
    """The contract's expected .grad of every trainable parameter: {name: float64 clipped sum}.

    clipping: a style name (see default_groups) or explicit groups of parameter names.
    thresholds: per-group C_g; default default_thresholds(max_grad_norm, G).
    oracle: "loop" (per_sample_grads_loop) or "vmap" (per_sample_grads_vmap).
    """
    per_sample_fn = {"loop": per_sample_grads_loop, "vmap": per_sample_grads_vmap}.get(oracle)
    if per_sample_fn is None:
        raise ValueError(f"oracle={oracle!r}; choose 'loop' or 'vmap'")
    groups = default_groups(model, clipping) if isinstance(clipping, str) else [list(g) for g in clipping]
    if thresholds is None:
        thresholds = default_thresholds(max_grad_norm, len(groups))
    per_sample = per_sample_fn(model, loss_fn, batch, dtype=torch.float64)
    return clipped_sum(per_sample, groups, thresholds, clip_fn)
