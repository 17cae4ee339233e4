"""rows: a sum over dims that include the batch dim (bias, LayerNorm/RMSNorm affine, elementwise parameters).

Fused: x (B, R, P), s_i = sum_r x_i[r]; the per-sample row sums are formed once (dpcompile::rows_colsum) and read by
both the norm and the clipped sum."""
from __future__ import annotations

import torch

from ...codegen import ops
from ...errors import UnsupportedGradientError
from ..batchdim import BDim, node_location
from ..symbolic import rank_of
from ..patterns import Site, numel, reason
from . import SiteKind, register_site_kind

aten = torch.ops.aten


def classify(node, st, state, name) -> Site:
    x = node.args[0]
    sx = st(x)
    if not isinstance(sx, BDim):
        raise UnsupportedGradientError(
            f"gradient of parameter `{name}` mixes samples at `{node.name}`{node_location(node)}{reason(state)}")
    rank = rank_of(x)
    dims = node.args[1] if node.target is aten.sum.dim_IntList and len(node.args) > 1 else None
    dims = list(range(rank)) if not dims else [d + rank if d < 0 else d for d in dims]
    # positions in the split tensor (B, *pre, T', *post): old dim j -> j + 1
    reduced = sorted(d + 1 for d in dims)
    kept = [d + 1 for d in range(rank) if d not in dims]
    return Site("rows", node, {"x": x}, {"x": (sx.dim, sx)}, {"reduced_pos": reduced, "kept_pos": kept})


def fused_inputs(site: Site, env: dict, bsz) -> tuple:
    x = site.split("x", env, bsz)
    x = x.permute(0, *site.info["reduced_pos"], *site.info["kept_pos"])
    return (x.reshape(x.shape[0], -1, numel(site.node)),)


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    (x,) = fused_inputs(site, env, bsz)
    return x.sum(1).reshape(x.shape[0], *site.node.meta["val"].shape)


def norm(site, ins, strategy, pg, env, randomized):
    # the per-sample row sums, once: the norm and the clipped sum both read this (B, 1, P) tensor
    ins = (ops.rows_colsum(*ins).unsqueeze(1),)
    return ops.rows_norm(*ins), ins


def column_sums(site, env, bsz):
    return ops.rows_colsum(*fused_inputs(site, env, bsz))


def clipped_sum(site, prepared, coef, strategy):
    return ops.rows_clipped_sum(*prepared, coef).reshape(site.node.meta["val"].shape)


KIND = register_site_kind(SiteKind(
    "rows", classify, per_sample, targets=(aten.sum.dim_IntList, aten.sum.default), fused_inputs=fused_inputs,
    norm=norm, clipped_sum=clipped_sum, column_sums=column_sums), replace=True)
