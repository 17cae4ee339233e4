"""embedding: embedding_dense_backward / index_put(accumulate) with per-sample or positional indices.

Fused: idx (B, T), g (B, T, D), s_i = sum_t onehot(idx_it) g_it (padding row zero); positional ids shared by every
sample (position embeddings) are expanded over the batch."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ...codegen import ops
from ...errors import UnsupportedGradientError
from ..batchdim import BDim, node_location
from ..symbolic import graph_shape_env, rank_of, sizes_of, statically_equal
from ..patterns import Site
from . import SiteKind, register_site_kind
from . import rows as rows_kind

aten = torch.ops.aten
_ZERO_FACTORIES = {aten.full.default, aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_INDEX_PUTS = (aten.index_put.default, aten._unsafe_index_put.default, aten._unsafe_masked_index_put_accumulate.default)


def classify(node, st, state, name) -> Site:
    if node.target is aten.embedding_dense_backward.default:
        grad, idx, num_weights, padding_idx, scale_by_freq = node.args[:5]
        if scale_by_freq:
            raise UnsupportedGradientError(
                f"embedding for `{name}` uses scale_grad_by_freq, which scales each gradient by counts over the "
                "whole batch and so mixes samples; turn it off")
        return _index_site(node, name, st, idx, grad, None, num_weights, padding_idx, grad.meta["val"].shape[-1])
    if node.target is aten._unsafe_masked_index_put_accumulate.default:
        base, mask, indices, values = node.args[:4]
    else:
        base, indices, values = node.args[:3]
        mask = None
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if not accumulate:
            raise UnsupportedGradientError(f"gradient of `{name}` is an index_put without accumulate at `{node.name}`")
    if not (isinstance(base, fx.Node) and base.target in _ZERO_FACTORIES and _is_zero_fill(base)):
        raise UnsupportedGradientError(
            f"gradient of `{name}` scatters into a non-zero tensor at `{node.name}`{node_location(node)}"
        )
    if len(indices) != 1 or indices[0] is None:
        raise UnsupportedGradientError(f"gradient of `{name}` scatters with multi-dim indices at `{node.name}`")
    base_shape = base.meta["val"].shape
    width = 1
    for s in base_shape[1:]:
        width = width * s
    return _index_site(node, name, st, indices[0], values, mask, base_shape[0], -1, width)


def _is_zero_fill(node: fx.Node) -> bool:
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target in (aten.new_zeros.default, aten.zeros.default, aten.zeros_like.default)


def _index_site(node, name, st, idx, grad, mask, num_weights, padding_idx, width) -> Site:
    si, sg = st(idx), st(grad)
    idx_rank = rank_of(idx)
    layout = si if isinstance(si, BDim) else sg if isinstance(sg, BDim) and sg.dim < idx_rank else None
    if layout is None or (isinstance(si, BDim) and isinstance(sg, BDim) and si != sg):
        raise UnsupportedGradientError(
            f"gradient of `{name}` at `{node.name}`{node_location(node)}: cannot tell which sample each index belongs to"
        )
    operands = {"idx": idx, "grad": grad}
    layouts = {"idx": (layout.dim, layout), "grad": (layout.dim, layout)}
    if mask is not None:
        operands["mask"] = mask
        layouts["mask"] = (layout.dim, layout)
    return Site("embedding", node, operands, layouts,
                {"num_weights": num_weights, "padding_idx": padding_idx, "width": width})


def fused_inputs(site: Site, env: dict, bsz) -> tuple:
    g = site.split("grad", env, bsz)
    if "idx" in site.layouts:
        idx = site.split("idx", env, bsz)
    else:  # positional ids shared by every sample (position embeddings)
        idx = env[site.operands["idx"]].reshape(1, -1).expand(bsz, -1)
    if "mask" in site.operands:
        g = g * site.split("mask", env, bsz).to(g.dtype)
    return idx.reshape(idx.shape[0], -1), g.reshape(g.shape[0], -1, site.info["width"])


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    idx, g = fused_inputs(site, env, bsz)
    B, T = idx.shape
    pad = site.info["padding_idx"]
    if pad >= 0:
        g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
    rows = torch.arange(B, device=idx.device).view(B, 1).expand(B, T)
    out = g.new_zeros((B, site.info["num_weights"], g.shape[-1]))
    out = out.index_put((rows, idx.long()), g, accumulate=True)
    return out.reshape(B, *site.node.meta["val"].shape)


def absorb(c, batch_size):
    """sum over the batch, reshapes, then a scatter by batch-free ids (a position embedding's gradient): the
    same as an embedding site whose ids every sample shares. Returns that site, or None if c is not this shape."""
    site = c.site
    if site.kind != rows_kind.KIND.name:
        return None
    dim, layout = site.layouts["x"]
    # the sum must be over exactly the samples: one dim, holding nothing but the batch
    x_size = sizes_of(site.operands["x"])[dim]
    if site.info["reduced_pos"] != [dim + 1] or layout.inner != 1 or \
            not statically_equal(x_size, batch_size, graph_shape_env(site.node.graph)):
        return None
    steps = list(c.chain)
    while steps and steps[0].node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        steps.pop(0)
    if not steps or steps[0].node.target is not aten.embedding_dense_backward.default or steps[0].pos != 0:
        return None
    emb = steps[0].node
    grad_in, idx, num_weights, padding_idx = emb.args[:4]
    width = grad_in.meta["val"].shape[-1]
    if grad_in.meta["val"].numel() != site.node.meta["val"].numel() or site.node.meta["val"].shape[-1] != width:
        return None  # the reshapes must keep rows of `width` in order
    new = Site(KIND.name, emb, {"idx": idx, "grad": site.operands["x"]}, {"grad": site.layouts["x"]},
               {"num_weights": num_weights, "padding_idx": padding_idx, "width": width})
    return dataclasses.replace(c, site=new, chain=steps[1:])


def norm(site, ins, strategy, pg, env, randomized):
    return ops.embedding_norm(*ins, site.info["padding_idx"]), ins


def clipped_sum(site, prepared, coef, strategy):
    return ops.embedding_clipped_sum(*prepared, coef, site.info["num_weights"], site.info["padding_idx"]).reshape(
        site.node.meta["val"].shape)


KIND = register_site_kind(SiteKind(
    "embedding", classify, per_sample, targets=(aten.embedding_dense_backward.default,) + _INDEX_PUTS,
    fused_inputs=fused_inputs, norm=norm, clipped_sum=clipped_sum, absorb=absorb), replace=True)
