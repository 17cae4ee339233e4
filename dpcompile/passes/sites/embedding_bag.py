"""embedding_bag: the weight gradient of nn.EmbeddingBag with one bag per sample (a (B, L) input), modes sum, mean
and max. The batch-dim rule (batchdim.py) accepts the forward and the backward only where the offsets are iota(B,
start=0, step=L), so bag b is sample b.

Fused, with the embedding kind's ops: sample b's gradient is an embedding gradient of its own indices idx (B, T),
rows g (B, T, D): sum mode T = L and g_bt = w_bt * grad_b (w: per_sample_weights, or 1), mean mode the same divided
by the bag's size, max mode T = D and row d of sample b is grad_b[d] on column d, at the index max_indices[b, d] that
won the max (empty bags, index -1, contribute nothing)."""
from __future__ import annotations

import torch

from ...codegen import ops
from ...errors import UnsupportedGradientError
from ..batchdim import BDim, Mixed, node_location
from ..patterns import Site
from . import SiteKind, register_site_kind

aten = torch.ops.aten
SUM, MEAN, MAX = 0, 1, 2


def _args(node):
    """(grad, indices, bag_size, max_indices, num_weights, scale_grad_by_freq, mode, per_sample_weights, padding)"""
    a = list(node.args)
    if node.target is aten._embedding_bag_backward.default:
        grad, idx, _offsets, _o2b, bag_size, max_idx, num_weights, scale, mode, _sparse = a[:10]
        psw = a[10] if len(a) > 10 else node.kwargs.get("per_sample_weights")
        pad = a[11] if len(a) > 11 else node.kwargs.get("padding_idx", -1)
    else:  # _embedding_bag_dense_backward
        grad, idx, _o2b, bag_size, max_idx, num_weights, scale, mode = a[:8]
        psw = a[8] if len(a) > 8 else node.kwargs.get("per_sample_weights")
        pad = a[9] if len(a) > 9 else node.kwargs.get("padding_idx", -1)
    return grad, idx, bag_size, max_idx, num_weights, scale, mode, psw, -1 if pad is None else pad


def classify(node, st, state, name) -> Site:
    grad, idx, bag_size, max_idx, num_weights, scale, mode, psw, pad = _args(node)
    if scale:
        raise UnsupportedGradientError(
            f"embedding bag for `{name}` uses scale_grad_by_freq, which scales each gradient by counts over the "
            "whole batch and so mixes samples; turn it off")
    sg, si = st(grad), st(idx)
    if not isinstance(state, Mixed) or state.unknown or sg != BDim(0) or not isinstance(si, BDim) or si.dim != 0:
        raise UnsupportedGradientError(
            f"gradient of `{name}` at `{node.name}`{node_location(node)}: an embedding bag whose bags are not one per "
            "sample (offsets other than those nn.EmbeddingBag builds for a 2-D input)")
    if mode not in (SUM, MEAN, MAX) or (mode == MAX and psw is not None):
        raise UnsupportedGradientError(f"gradient of `{name}`: embedding bag mode {mode} at `{node.name}`")
    operands = {"grad": grad, "idx": idx, "bag_size": bag_size, "max_idx": max_idx}
    layouts = {"grad": (0, sg), "idx": (0, si), "bag_size": (0, BDim(0)), "max_idx": (0, BDim(0))}
    if psw is not None:
        operands["psw"], layouts["psw"] = psw, (0, si)
    return Site(KIND.name, node, operands, layouts,
                {"mode": mode, "num_weights": num_weights, "padding_idx": pad, "width": grad.meta["val"].shape[-1]})


def fused_inputs(site: Site, env: dict, bsz) -> tuple:
    g = site.split("grad", env, bsz).reshape(bsz, -1)  # (B, D)
    if site.info["mode"] == MAX:
        idx = site.split("max_idx", env, bsz).reshape(bsz, -1).long()  # (B, D)
        empty = idx < 0
        rows = torch.diag_embed(g.masked_fill(empty, 0))  # (B, D, D): row d is grad[d] on column d
        return idx.masked_fill(empty, 0), rows
    idx = site.split("idx", env, bsz).reshape(bsz, -1)  # (B, L)
    rows = g.unsqueeze(1).expand(bsz, idx.shape[1], g.shape[-1])
    if "psw" in site.operands:
        rows = rows * site.split("psw", env, bsz).reshape(bsz, -1, 1).to(rows.dtype)
    if site.info["mode"] == MEAN:  # an empty bag (all padding) has no rows to scale
        size = site.split("bag_size", env, bsz).reshape(bsz, 1, 1).clamp(min=1).to(rows.dtype)
        rows = rows / size
    return idx, rows


def _pad(site) -> int:
    return site.info["padding_idx"] if site.info["mode"] != MAX else -1


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    idx, g = fused_inputs(site, env, bsz)
    B, T = idx.shape
    pad = _pad(site)
    if pad >= 0:
        g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
    rows = torch.arange(B, device=idx.device).view(B, 1).expand(B, T)
    out = g.new_zeros((B, site.info["num_weights"], g.shape[-1]))
    return out.index_put((rows, idx.long()), g, accumulate=True)


def norm(site, ins, strategy, pg, env, randomized):
    return ops.embedding_norm(*ins, _pad(site)), ins


def clipped_sum(site, prepared, coef, strategy):
    return ops.embedding_clipped_sum(*prepared, coef, site.info["num_weights"], _pad(site)).reshape(
        site.node.meta["val"].shape)


KIND = register_site_kind(SiteKind(
    "embedding_bag", classify, per_sample,
    targets=(aten._embedding_bag_backward.default, aten._embedding_bag_dense_backward.default),
    fused_inputs=fused_inputs, norm=norm, clipped_sum=clipped_sum), replace=True)
