"""Batch-dim rules of ops that take or put part of a tensor: slice / narrow / select / split / unbind / chunk, cat
and stack, index_select, advanced indexing (index) and its backward (index_put), select_scatter / slice_scatter.
Taking part of the batch dim mixes samples (a full slice does not); batch-free indices on other dims keep samples
apart."""
from __future__ import annotations

import torch.fx as fx

from ..batchdim_states import BDim, State, _arg, _norm_dim, aten, batchdim_rule
from ..symbolic import rank_of, sizes_of, statically_equal

# split / chunk take their sizes (or count) first and the dim second; slice, narrow, select, unbind the dim first
_SPLIT_DIM_ARG = {aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2}


@batchdim_rule(aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.split.Tensor,
               aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
def slice_like(analysis, node: fx.Node) -> State:
    # slice / narrow / select / split along a dim: fine unless that dim carries samples
    s = analysis.state(node.args[0])
    rank = rank_of(node.args[0])
    t = node.target
    d = _norm_dim(_arg(node, _SPLIT_DIM_ARG.get(t, 1), node.kwargs.get("dim", 0)), rank)
    if d == s.dim:
        if t is aten.slice.Tensor and statically_equal(sizes_of(node)[d], sizes_of(node.args[0])[d],
                                                       analysis.shape_env):
            return s  # a full slice
        return analysis._mix(node, "an op that takes part of the batch dim")
    if t is aten.select.int:
        return BDim(s.dim - (1 if d < s.dim else 0), s.inner)
    if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default):
        n = len(node.meta["val"])
        new = BDim(s.dim - (1 if t is aten.unbind.int and d < s.dim else 0), s.inner)
        return tuple(new for _ in range(n))
    return s


@batchdim_rule(aten.cat.default)
def cat(analysis, node: fx.Node) -> State:
    tensors = node.args[0]
    rank = rank_of(node)
    d = _norm_dim(_arg(node, 1, 0), rank)
    found = analysis._pointwise(node, [a for a in tensors if rank_of(a) == rank])
    if isinstance(found, BDim) and found.dim == d:
        if whole_rounds(analysis, tensors, found, d):
            return found
        return analysis._mix(node, "a concatenation along the batch dim")
    return found


def whole_rounds(analysis, tensors, s: BDim, d: int) -> bool:
    """A concatenation along the batch dim of operands that each hold whole rounds of the B sample blocks
    (every operand per-sample with the same layout, its size a multiple of inner * B): each operand starts at
    a multiple of inner * B, so index i still belongs to sample (i // inner) % B (torch.stack of per-sample
    tensors along a dim before the batch dim is decomposed into this cat and a view)."""
    for a in tensors:
        sizes = sizes_of(a)
        if sizes is None or len(sizes) != rank_of(tensors[0]) or analysis.state(a) != s:
            return False
        if analysis._quotient(sizes[d], s.inner * analysis.B) is None:
            return False
    return True


@batchdim_rule(aten.stack.default)
def stack(analysis, node: fx.Node) -> State:
    tensors = node.args[0]
    d = _norm_dim(_arg(node, 1, 0), rank_of(node))
    found = analysis._pointwise(node, list(tensors), rank_of(tensors[0]))
    if isinstance(found, BDim):
        return BDim(found.dim + (1 if d <= found.dim else 0), found.inner)
    return found


@batchdim_rule(aten.index_select.default)
def index_select(analysis, node: fx.Node) -> State:
    x, d, idx = node.args[:3]
    s = analysis.state(x)
    if isinstance(analysis.state(idx), BDim):
        return analysis._unknown(node, "index_select with per-sample indices")
    if _norm_dim(d, rank_of(x)) == s.dim:
        return analysis._mix(node, "index_select along the batch dim")
    return s


@batchdim_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def index(analysis, node: fx.Node) -> State:
    x, indices = node.args[:2]
    sx = analysis.state(x)
    present = [i for i, ix in enumerate(indices) if ix is not None]
    idx_states = [analysis.state(indices[i]) for i in present]
    if not present or present != list(range(present[0], present[-1] + 1)):
        return analysis._unknown(node, "advanced indexing with non-adjacent indices")
    idx_rank = max(rank_of(indices[i]) for i in present)
    p0, pk = present[0], present[-1]
    if isinstance(sx, BDim):
        if p0 <= sx.dim <= pk:
            if any(isinstance(s, BDim) for s in idx_states):
                return analysis._unknown(node, "gathering along the batch dim")
            return analysis._mix(node, "indexing into the batch dim")
        if any(isinstance(s, BDim) for s in idx_states):
            return analysis._unknown(node, "indexing per-sample data with per-sample indices")
        return BDim(sx.dim if sx.dim < p0 else sx.dim - len(present) + idx_rank, sx.inner)
    found = None
    for i, s in zip(present, idx_states):
        if isinstance(s, BDim):
            aligned = BDim(p0 + s.dim + idx_rank - rank_of(indices[i]), s.inner)
            if found is not None and found != aligned:
                return analysis._mix(node, "indices from different samples combined")
            found = aligned
    return found


@batchdim_rule(aten.select_scatter.default, aten.slice_scatter.default)
def scatter_into(analysis, node: fx.Node) -> State:
    # select_scatter / slice_scatter(base, src, dim, ...): the backward of select / slice
    base, src, d = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else 0
    rank = rank_of(base)
    d = _norm_dim(d, rank)
    sb, ss = analysis.state(base), analysis.state(src)
    if isinstance(ss, BDim) and node.target is aten.select_scatter.default:
        ss = BDim(ss.dim + (1 if ss.dim >= d else 0), ss.inner)
    full = node.target is aten.slice_scatter.default and statically_equal(sizes_of(base)[d], sizes_of(src)[d],
                                                                          analysis.shape_env) \
        and (len(node.args) < 6 or node.args[5] == 1)
    if full:
        return ss  # the source covers the whole base: a copy
    found = None
    for s in (sb, ss):
        if isinstance(s, BDim):
            if s.dim == d or (found is not None and found != s):
                return analysis._mix(node, "a scatter along the batch dim")
            found = s
    return found


@batchdim_rule(aten.index_put.default, aten._unsafe_index_put.default, aten.index_put_.default,
               aten._unsafe_masked_index_put_accumulate.default)
def index_put(analysis, node: fx.Node) -> State:
    # scatter(-accumulate) of values into base at index positions. With per-sample indices, or the batch dim
    # among the indexed dims, samples are summed together (an embedding gradient: a site, or a mix). With
    # batch-free indices on other dims (backward of x[..., idx] / index_select) samples stay apart.
    if node.target is aten._unsafe_masked_index_put_accumulate.default:
        base, mask, indices, values = node.args[:4]
    else:
        base, indices, values = node.args[:3]
        mask = None
    present = [i for i, ix in enumerate(indices) if ix is not None]
    if any(isinstance(analysis.state(indices[i]), BDim) for i in present) or not present:
        return analysis._mix(node, "a scatter-accumulate over the batch")
    if present != list(range(present[0], present[-1] + 1)):
        return analysis._unknown(node, "index_put with non-adjacent indices")
    p0 = present[0]
    idx_rank = max(rank_of(indices[i]) for i in present)
    found = None
    sv = analysis.state(values)
    if isinstance(sv, BDim):
        full_rank = rank_of(base) - len(present) + idx_rank  # values broadcast to base[:p0] + idx + rest
        v = sv.dim + full_rank - rank_of(values)
        if p0 <= v < p0 + idx_rank:
            return analysis._mix(node, "a scatter along the batch dim")
        found = BDim(v if v < p0 else v - idx_rank + len(present), sv.inner)
    sb = analysis.state(base)
    if isinstance(sb, BDim):
        if sb.dim in present or (found is not None and found != sb):
            return analysis._mix(node, "a scatter along the batch dim")
        found = sb
    if mask is not None and isinstance(analysis.state(mask), BDim) and found is None:
        return analysis._unknown(node, "a masked scatter with per-sample mask only")
    return found
