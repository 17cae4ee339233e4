"""Batch-dim rules of matrix products and attention: mm / addmm, bmm / baddbmm (a contraction over the batch dim
mixes samples; one that pairs rows of one sample with columns of another too) and scaled-dot-product attention
(found by overload packet name: flash / efficient / cudnn / cpu kernels and their backwards)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..batchdim_states import BDim, Mixed, State, _flatten_nodes, aten, batchdim_rule
from ..symbolic import rank_of

_SDPA_OPS = {
    name for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
        "_efficient_attention_forward", "_efficient_attention_backward", "_flash_attention_forward",
        "_flash_attention_backward",
    )
}


@batchdim_rule(aten.mm.default, aten.addmm.default)
def mm(analysis, node: fx.Node) -> State:
    if node.target is aten.addmm.default:
        bias, a, b = node.args[:3]
    else:
        bias, (a, b) = None, node.args[:2]
    sa, sb = analysis.state(a), analysis.state(b)
    if isinstance(sa, BDim) and sa.dim == 1 or isinstance(sb, BDim) and sb.dim == 0:
        return analysis._mix(node, "a matmul contracting the batch dim")
    if isinstance(sa, BDim) and isinstance(sb, BDim):
        return analysis._mix(node, "a matmul pairing rows of one sample with columns of another")
    out = BDim(0, sa.inner) if isinstance(sa, BDim) else BDim(1, sb.inner) if isinstance(sb, BDim) else None
    sbias = analysis.state(bias) if bias is not None else None
    if isinstance(sbias, BDim):
        aligned = BDim(sbias.dim + 2 - rank_of(bias), sbias.inner)
        if out is not None and out != aligned:
            return analysis._mix(node, "addmm combines different samples")
        out = aligned
    return out


@batchdim_rule(aten.bmm.default)
def bmm(analysis, node: fx.Node, operands=None) -> State:
    a, b = operands if operands is not None else node.args[:2]
    sa, sb = analysis.state(a), analysis.state(b)
    if isinstance(sa, BDim) and sa.dim == 2 or isinstance(sb, BDim) and sb.dim == 1:
        return analysis._mix(node, "a batched matmul contracting the batch dim")
    outs = []
    if isinstance(sa, BDim):
        outs.append(BDim(sa.dim, sa.inner))
    if isinstance(sb, BDim):
        outs.append(BDim(0 if sb.dim == 0 else 2, sb.inner))
    if len(outs) == 2 and (outs[0] != outs[1] or outs[0].dim != 0):
        return analysis._mix(node, "a batched matmul pairing different samples")
    return outs[0] if outs else None


@batchdim_rule(aten.baddbmm.default)
def baddbmm(analysis, node: fx.Node) -> State:
    """baddbmm(input, b1, b2): beta * input + alpha * bmm(b1, b2), input broadcast to the product's shape."""
    prod_state = bmm(analysis, node, node.args[1:3])
    if isinstance(prod_state, Mixed):
        return prod_state
    operands = [node.args[0]]
    found = analysis._pointwise(node, operands, 3)
    if isinstance(found, BDim) and isinstance(prod_state, BDim) and found != prod_state:
        return analysis._mix(node, "baddbmm adds values of different samples")
    return prod_state if isinstance(prod_state, BDim) else found


@batchdim_rule(packets=_SDPA_OPS)
def sdpa(analysis, node: fx.Node) -> State:
    found = None
    for a in _flatten_nodes((node.args, node.kwargs)):
        s = analysis.state(a)
        if isinstance(s, BDim):
            if s.dim not in (0, 1) or (found is not None and found != s):
                return analysis._mix(node, "attention across samples")
            found = s
    vals = node.meta.get("val")
    if isinstance(vals, (tuple, list)):
        return tuple(found if isinstance(v, torch.Tensor) and v.dim() >= 3 else None for v in vals)
    return found
