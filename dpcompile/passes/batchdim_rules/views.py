"""Batch-dim rules of views and ops that move, add or drop dims: view / reshape (exact index arithmetic over the
symbolic sizes), permute, transpose, unsqueeze, squeeze, expand, as_strided, repeat, flip, complex views."""
from __future__ import annotations

import math

import sympy
import torch
import torch.fx as fx

from ..batchdim_states import BDim, Mixed, State, _arg, _norm_dim, aten, batchdim_rule, prims
from ..symbolic import contiguous_strides, prod, rank_of, size_hint, sizes_of, statically_equal, sym_expr

_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@batchdim_rule(*_VIEW_OPS)
def view_op(analysis, node: fx.Node) -> State:
    return view(analysis, node, node.args[0])


def view(analysis, node: fx.Node, src: fx.Node) -> State:
    s = analysis.state(src)
    ins, outs = sizes_of(src), sizes_of(node)
    if prod(outs) == 0:
        return None  # an empty tensor holds no sample's data (the loss over T - 1 = 0 shifted targets at T = 1)
    block = s.inner * prod(ins[s.dim + 1:])  # elements per sample block in row-major order
    for e in range(len(outs)):
        after = prod(outs[e + 1:])
        inner = analysis._quotient(block, after)  # indices of dim e per sample block
        # dim e holds whole rounds of the B blocks (outer of them: T for a time-major flatten)
        if inner is not None and analysis._quotient(outs[e], inner * analysis.B) is not None:
            return BDim(e, inner)
    if view_at_hints(analysis, s, ins, outs):
        return Mixed(node, "a reshape whose sample blocks hold at the traced sizes but cannot be proven for every "
                           "value of the symbolic sizes", unknown=True, symbolic=True)
    return analysis._mix(node, "a reshape that spreads one sample's block over several dims")


def view_at_hints(analysis, s: BDim, ins, outs) -> bool:
    """The view keeps whole sample blocks in one dim at the sizes the graph was traced with (sizes with
    symbols only): then only the proof for every size failed, not the layout."""
    exprs = [s.inner, analysis.B, *ins, *outs]
    if analysis.shape_env is None or not any(sympy.sympify(x).free_symbols for x in exprs):
        return False
    try:
        inner, B = size_hint(s.inner, analysis.shape_env), size_hint(analysis.B, analysis.shape_env)
        ins = [size_hint(x, analysis.shape_env) for x in ins]
        outs = [size_hint(x, analysis.shape_env) for x in outs]
    except Exception:  # noqa: BLE001 (a size without a hint)
        return False
    block = inner * math.prod(ins[s.dim + 1:])
    for e in range(len(outs)):
        after = math.prod(outs[e + 1:])
        if after and block % after == 0 and outs[e] % (block // after * B) == 0:
            return True
    return False


@batchdim_rule(aten.permute.default)
def permute(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    rank = rank_of(node.args[0])
    perm = [_norm_dim(p, rank) for p in node.args[1]]
    return BDim(perm.index(s.dim), s.inner)


@batchdim_rule(aten.t.default, aten.transpose.int)
def transpose(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    rank = rank_of(node.args[0])
    if node.target is aten.t.default:
        a, b = 0, rank - 1 if rank > 1 else 0
    else:
        a, b = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
    d = b if s.dim == a else a if s.dim == b else s.dim
    return BDim(d, s.inner)


@batchdim_rule(aten.unsqueeze.default)
def unsqueeze(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    d = _norm_dim(node.args[1], rank_of(node))
    return BDim(s.dim + (1 if d <= s.dim else 0), s.inner)


@batchdim_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    rank = rank_of(node.args[0])
    ins = sizes_of(node.args[0])
    if node.target is aten.squeeze.default:
        dims = [i for i in range(rank) if ins[i] == 1]
    else:
        arg = node.args[1]
        dims = [_norm_dim(d, rank) for d in (arg if isinstance(arg, (list, tuple)) else [arg])]
        dims = [d for d in dims if ins[d] == 1]
    if s.dim in dims:  # only possible when B == 1: the sample dim disappears; keep it as a view would
        return view(analysis, node, node.args[0])
    return BDim(s.dim - sum(d < s.dim for d in dims), s.inner)


@batchdim_rule(aten.expand.default)
def expand(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    return BDim(s.dim + rank_of(node) - rank_of(node.args[0]), s.inner)


@batchdim_rule(aten.as_strided.default)
def as_strided(analysis, node: fx.Node) -> State:
    """as_strided(x, size, stride, offset) that reads x's elements in row-major order (contiguous x at offset 0,
    contiguous strides of `size`, as many elements): the same as x.view(size) (GroupNorm's decomposition).
    Any other as_strided may read one sample's memory at another's position: unknown."""
    x, size, stride = node.args[:3]
    offset = _arg(node, 3, None)
    xv, out = x.meta.get("val"), node.meta.get("val")
    env = analysis.shape_env
    if isinstance(xv, torch.Tensor) and isinstance(out, torch.Tensor) and offset in (None, 0) \
            and contiguous_strides(xv.shape, xv.stride(), env) and statically_equal(
                sym_expr(xv.storage_offset()), 0, env) \
            and contiguous_strides(out.shape, list(stride), env) \
            and statically_equal(prod(sizes_of(x)), prod(sizes_of(node)), env):
        return view(analysis, node, x)
    return analysis._unknown(node, "an as_strided that is not a plain reshape of a contiguous tensor")


@batchdim_rule(aten.repeat.default)
def repeat(analysis, node: fx.Node) -> State:
    """x.repeat(*r): new leading dims, and each dim tiled r[i] times. A tiled batch dim holds whole rounds of
    the B sample blocks (its size is a multiple of inner * B), so every tile keeps the same sample order."""
    s = analysis.state(node.args[0])
    d = s.dim + len(node.args[1]) - rank_of(node.args[0])
    if node.args[1][d] != 1 and analysis._quotient(sizes_of(node.args[0])[s.dim], s.inner * analysis.B) is None:
        return analysis._unknown(node, "repeat of a batch dim that does not hold whole rounds of the samples")
    return BDim(d, s.inner)


@batchdim_rule(aten.view_as_complex.default)
def view_as_complex(analysis, node: fx.Node) -> State:
    """(..., 2) real -> (...) complex: the last dim (the pair) disappears."""
    s = analysis.state(node.args[0])
    if s.dim == rank_of(node.args[0]) - 1:
        return analysis._mix(node, "view_as_complex pairs values along the batch dim")
    return s


@batchdim_rule(aten.view_as_real.default, aten.real.default, aten.imag.default, aten._conj.default,
               aten.resolve_conj.default, aten.resolve_neg.default)
def same_dims(analysis, node: fx.Node) -> State:
    """view_as_real ((...) complex -> (..., 2): a dim added last), real / imag, conj: the dims are kept."""
    return analysis.state(node.args[0])


@batchdim_rule(aten.flip.default, prims.rev.default)
def flip(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    dims = [_norm_dim(d, rank_of(node.args[0])) for d in node.args[1]]
    if s.dim in dims:
        return analysis._mix(node, "reversing the batch dim")
    return s
