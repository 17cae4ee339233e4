"""tied_embedding: one parameter W (V, d) that is both an embedding table (an `embedding` site: rows gathered by
per-sample ids) and a linear head (a `linear` site: logits = H W^T), e.g. GPT-2's and SmolLM2's tied token
embedding and LM head. Not matched by any op: `combine` recognises the pair among a parameter's contributions, and
the planner (plan.plan_group) takes it where its cost is below materializing the (B, V, d) per-sample gradients
(or where those do not fit the scratch budget at all).

Sample i's gradient is ke G_i + kh E_i (G_i = sum_t onehot(id_t) g_t, E_i = dY_i^T H_i, ke / kh the signed
scalars of each use's chain); its squared norm is ke^2 ||G_i||^2 + kh^2 ||E_i||^2 + 2 ke kh <G_i, E_i>, each term
from a form that never builds a V x d per-sample matrix (codegen/tied_embedding_ops.py), and its clipped sum is an
index_add of the scaled embedding gradients plus one GEMM of the scaled dY with H.

Strategies (the planner's names): tied_embedding_ghost (||E_i||^2 from Th x Th Gram products) and
tied_embedding_direct (from the per-sample GEMM with the norm in its epilogue, CUDA), against materialize.
Handled: one or more embedding sites with per-sample ids (several lookups of one table, e.g. an encoder's and a
decoder's, are one: their ids and scaled grads concatenated per sample) and exactly one linear site, each reaching the parameter
through reshapes that keep its (V, d) layout, pairs of transposes, casts, negation and scalar factors, the head's
mm giving the gradient in W's layout (mm(dY^T, H), as AOTAutograd writes it); anything else stays materialized.
"""
from __future__ import annotations

import dataclasses

import sympy
import torch

from ...codegen import tied_embedding_ops as ops
from ..patterns import Site
from ..symbolic import sym_expr
from . import SiteKind, register_site_kind
from . import embedding as embedding_kind
from . import linear as linear_kind

aten = torch.ops.aten
prims = torch.ops.prims

STRATEGIES = {"tied_embedding_ghost": "ghost", "tied_embedding_direct": "direct"}

# chain ops that keep the value's layout when their output has their input's shape
_SAME_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                aten.alias.default, aten.contiguous.default, aten.detach.default, prims.convert_element_type.default,
                aten._to_copy.default}


def _shape(x) -> tuple | None:
    shape = tuple(x.meta["val"].shape) if hasattr(x, "meta") and "val" in x.meta else None
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    return shape


def _chain_map(c, site_shape: tuple):
    """(signed scalar k, transposed) such that the chain maps the site's value s to k * s (transposed: k * s^T),
    or None for a chain of any other op."""
    k = -1.0 if c.negate else 1.0
    flipped = False
    shape = site_shape
    for step in c.chain:
        n, t = step.node, step.node.target
        out = _shape(n)
        if out is None:
            return None
        if t in _SAME_LAYOUT:
            if out != shape:
                return None
        elif t in (aten.t.default, aten.transpose.int, aten.permute.default):
            if len(shape) != 2 or out != shape[::-1]:
                return None
            if t is aten.permute.default and [p % 2 for p in n.args[1]] != [1, 0]:
                return None
            if t is aten.transpose.int and n.args[1] % 2 == n.args[2] % 2:
                return None
            flipped = not flipped
        elif t is aten.neg.default:
            k = -k
        elif t in (aten.mul.Tensor, aten.mul.Scalar) and len(n.args) == 2 and _number(n.args[1 - step.pos]):
            k *= float(n.args[1 - step.pos])
        elif t in (aten.div.Tensor, aten.div.Scalar) and step.pos == 0 and _number(n.args[1]) and n.args[1] != 0:
            k /= float(n.args[1])
        else:
            return None
        if n.kwargs and t not in (prims.convert_element_type.default, aten._to_copy.default):
            return None
        shape = out
    return k, flipped, shape


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def combine(pg, batch_size, budget_bytes: float, dev):
    """(one contribution of this kind standing for pg's embedding and linear contributions, {strategy: seconds as
    sympy expressions in the graph's sizes}, the bytes materializing would hold), or None if pg is not a table
    tied to a head in the form handled here. batch_size: the graph's batch size (a sympy symbol or a number)."""
    cs = pg.contributions
    emb = [c for c in cs if c.site.kind == embedding_kind.KIND.name]
    lin = [c for c in cs if c.site.kind == linear_kind.KIND.name]
    if not emb or len(lin) != 1 or len(cs) != len(emb) + 1:
        return None
    l = lin[0]
    param = _shape(pg.grad)
    if param is None or len(param) != 2:
        return None
    V, d = param
    ses, kes = [], []
    for e in emb:  # one or more lookups of the table (an encoder's and a decoder's, ...)
        se = e.site
        if "idx" not in se.layouts or "mask" in se.operands:  # token ids per sample (not positions shared by all)
            return None
        if _shape(se.node) != (V, d) or se.info.get("num_weights") != V or se.info.get("width") != d:
            return None
        me = _chain_map(e, (V, d))
        if me is None or me[1] or me[2] != (V, d):
            return None
        ses.append(se)
        kes.append(me[0])
    if len({se.info["padding_idx"] for se in ses}) != 1:
        return None
    sl = l.site
    site_l = _shape(sl.node)
    ml = _chain_map(l, site_l) if site_l is not None else None
    if ml is None or ml[2] != (V, d):
        return None
    # several lookups are one: their (ids, scaled grads) concatenated per sample scatter into the same G_i
    ke, kh, flipped = (kes[0] if len(kes) == 1 else 1.0), ml[0], ml[1]
    # s = a^T b is (M, N) and must be W's (V, d) layout as it is: dy = a. (A head whose mm gives s^T, (d, V), has
    # dy = b; no graph seen so far has that form, AOTAutograd writes the weight gradient as mm(dY^T, H): it stays
    # materialized until a test reaches it.)
    if flipped or site_l != (V, d):
        return None
    operands = {f"e{j}_{r}": n for j, se in enumerate(ses) for r, n in se.operands.items()}
    site = Site(KIND.name, sl.node, {**operands, **{f"h_{r}": n for r, n in sl.operands.items()}}, {},
                {"parts": (*ses, sl), "ke": ke, "kh": kh, "lookup_scales": tuple(kes) if len(kes) > 1 else None,
                 "dy": "a", "padding_idx": ses[0].info["padding_idx"], "num_weights": V, "width": d,
                 "originals": (*(se.node for se in ses), sl.node)})
    merged = dataclasses.replace(l, site=site, chain=[], negate=False)
    B = sympy.sympify(batch_size)
    rows_e = sum(sym_expr(se.operands["grad"].meta["val"].numel()) for se in ses) / d  # B * Te, all lookups
    rows_h = sym_expr(sl.operands["rows_b"].meta["val"].shape[0])  # B * Th
    itemsize = max(*(se.operands["grad"].meta["val"].element_size() for se in ses),
                   sl.operands["rows_b"].meta["val"].element_size())
    return merged, costs(B, rows_e / B, rows_h / B, V, d, itemsize, dev), B * V * d * itemsize


def costs(B, Te, Th, V, d, e: int, dev) -> dict:
    """Seconds (sympy) of each strategy for a tied table: Te ids and Th head rows per sample, V rows of width d,
    e bytes an element. The terms of passes/strategies.py's linear costs (flops at our GEMMs' rate, bytes at
    bandwidth, a launch per kernel)."""
    flops = dev.flops_16 if e <= 2 else dev.flops_32
    vendor = dev.flops_vendor if e <= 2 else dev.flops_32
    read = B * (Te * d + Th * (V + d)) * e / dev.bandwidth  # one pass over the operands
    bmm = 2 * B * Th * V * d / vendor  # the weight-gradient GEMM, vendor (the clipped sum's, as non-DP's)
    shared = (2 * B * Te * Te * d / flops  # ||G_i||^2: Te x Te Gram with the id mask
              + 2 * B * Te * Th * d / flops + B * Te * Th * e / dev.bandwidth  # cross term: g h^T, gathered dy
              + bmm + 2 * B * Te * d * e / dev.bandwidth + V * d * 4 / dev.bandwidth  # clipped sum
              + 2 * read + 9 * dev.launch)
    return {
        # ||E_i||^2: the ghost Gram products (passes/strategies.py's ghost term) / our per-sample norm GEMM
        "tied_embedding_ghost": shared + B * Th * Th * (V + d) / flops + 2 * dev.launch,
        "tied_embedding_direct": shared + 2 * B * Th * V * d / flops + dev.launch,
        # per-sample products (vendor bmm) and the embedding scatter into (B, V, d), added, normed, summed
        "materialize": (bmm + 8 * B * V * d * e / dev.bandwidth + read
                        + 7 * dev.launch),
    }


def fused_inputs(site: Site, env: dict, bsz) -> tuple:
    *ses, sl = site.info["parts"]
    scales = site.info.get("lookup_scales")
    if scales is None:
        idx, g = embedding_kind.fused_inputs(ses[0], env, bsz)
    else:  # several lookups: each one's grads times its chain's scalar, concatenated per sample (ke is then 1)
        pairs = [embedding_kind.fused_inputs(se, env, bsz) for se in ses]
        idx = torch.cat([i for i, _ in pairs], dim=1)
        g = torch.cat([gj * k for (_, gj), k in zip(pairs, scales)], dim=1)
    a, b = linear_kind.fused_inputs(sl, env, bsz)
    h, dy = (b, a) if site.info["dy"] == "a" else (a, b)
    return idx, g, h, dy


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    """(B, V, d): sum_j ke_j G_ij + kh E_i, materialized (the reference the fused ops are tested against)."""
    *ses, _ = site.info["parts"]
    _, _, h, dy = fused_inputs(site, env, bsz)
    scales = site.info.get("lookup_scales") or (site.info["ke"],)
    G = sum(embedding_kind.per_sample(se, env, bsz).reshape(bsz, site.info["num_weights"], site.info["width"]) * k
            for se, k in zip(ses, scales))
    E = torch.bmm(dy.transpose(1, 2).to(G.dtype), h.to(G.dtype))
    return G + E * site.info["kh"]


def norm(site, ins, strategy, pg, env, randomized):
    head = STRATEGIES.get(strategy, "ghost")
    return ops.tied_embedding_norm(*ins, site.info["ke"], site.info["kh"], site.info["padding_idx"], head), ins


def clipped_sum(site, prepared, coef, strategy):
    return ops.tied_embedding_clipped_sum(*prepared, coef, site.info["ke"], site.info["kh"],
                                          site.info["padding_idx"])


def classify(node, st, state, name) -> Site:
    from ...errors import UnsupportedGradientError

    raise UnsupportedGradientError(f"`{name}`: a tied_embedding site is only built from a parameter's embedding and "
                                   "linear contributions")


KIND = register_site_kind(SiteKind(
    "tied_embedding", classify, per_sample, fused_inputs=fused_inputs, norm=norm, clipped_sum=clipped_sum,
    combine=combine), replace=True)
