"""Batch-dim rules of reductions (sum / mean / amax / norms ..., and the count of targets != ignore_index by which
F.cross_entropy / nll_loss's default mean divides), of ops that act along one dim (softmax, cumsum, sort, topk,
gather, scatter) and of layer_norm."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..batchdim_states import BDim, State, _arg, _flatten_nodes, _norm_dim, aten, batchdim_rule, prims
from ..symbolic import rank_of

# reduction op -> (index of dims arg or None for "all dims", index of keepdim arg or None)
_REDUCTIONS = {
    aten.sum.dim_IntList: (1, 2), aten.sum.default: (None, None), aten.mean.dim: (1, 2),
    aten.mean.default: (None, None), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.var.correction: (1, "keepdim"), aten.var_mean.correction: (1, "keepdim"),
    aten.std.correction: (1, "keepdim"), aten.prod.dim_int: (1, 2), aten.prod.default: (None, None),
    aten.any.dim: (1, 2), aten.any.dims: (1, 2), aten.all.dim: (1, 2), aten.argmax.default: (1, 2),
    aten.argmin.default: (1, 2), aten.max.dim: (1, 2), aten.min.dim: (1, 2), aten.logsumexp.default: (1, 2),
    aten.max.default: (None, None), aten.min.default: (None, None), aten.linalg_vector_norm.default: (2, 3),
    prims.sum.default: (1, None), prims.var.default: (1, None),
}

_IGNORE_INDEX = -100  # F.cross_entropy / nll_loss's default ignore_index
_IGNORED_TARGET_MESSAGE = (
    "dpcompile: a target equals ignore_index=-100 in a loss whose default reduction='mean' divides by the number of "
    "targets that are not ignored in the whole batch; that count depends on every sample's label, so the loss is "
    "not a mean of per-sample losses. Write F.cross_entropy(..., reduction='sum') / batch_size, or leave no target "
    "ignored")

# ops that act along one dim (arg index of dim); samples must not be that dim
_ALONG_DIM = {
    aten._softmax.default: 1, aten._log_softmax.default: 1, aten._softmax_backward_data.default: 2,
    aten._log_softmax_backward_data.default: 2, aten.cumsum.default: 1, aten.cumprod.default: 1,
    aten.sort.default: 1, aten.sort.stable: "dim", aten.gather.default: 1, aten.scatter.src: 1,
    aten.scatter.value: 1, aten.scatter_add.default: 1, aten.topk.default: 2, aten.softmax.int: 1,
    aten.log_softmax.int: 1,
}


@batchdim_rule(*_REDUCTIONS)
def reduction(analysis, node: fx.Node) -> State:
    dims_idx, keep_idx = _REDUCTIONS[node.target]
    s = analysis.state(node.args[0])
    rank = rank_of(node.args[0])
    dims = None if dims_idx is None else _arg(node, dims_idx)
    if dims is None or dims == []:
        dims = list(range(rank))
    elif isinstance(dims, int):
        dims = [dims]
    dims = [_norm_dim(d, rank) for d in dims]
    if s.dim in dims:
        if is_target_count(analysis, node, dims):
            return checked_count(analysis, node)
        return analysis._mix(node, "a reduction over the batch dim")
    keep = bool(_arg(node, keep_idx, False)) if keep_idx is not None else False
    new = BDim(s.dim if keep else s.dim - sum(d < s.dim for d in dims), s.inner)
    if node.target in (aten.var_mean.correction, aten.max.dim, aten.min.dim):
        return (new, new)
    return new


def is_target_count(analysis, node: fx.Node, dims) -> bool:
    """sum(y != -100) over a 1-D integer target tensor with k targets per sample (BDim(0, k): one per sample,
    or a (B, T) tensor flattened): the count by which F.cross_entropy / nll_loss's default mean divides
    (ignore_index=-100)."""
    if node.target not in (aten.sum.default, aten.sum.dim_IntList) or _arg(node, 3) is not None \
            or node.kwargs.get("dtype") is not None:
        return False
    x = node.args[0]
    if not (isinstance(x, fx.Node) and x.target is aten.ne.Scalar and x.args[1] == _IGNORE_INDEX):
        return False
    y = x.args[0]
    val = y.meta.get("val") if isinstance(y, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and not val.is_floating_point() \
        and not val.is_complex() and val.dtype is not torch.bool and isinstance(analysis.state(y), BDim) \
        and analysis.state(y).dim == 0 and dims == [0]


def checked_count(analysis, node: fx.Node) -> State:
    """The count of targets != -100 equals the number of targets (B*k) exactly when no target is ignored: a
    check that it does is added to the graph (once), right after the count, and the count is then batch-free
    (it is B*k; meta "dpcompile_checked_count" holds k, which the loss-reduction check reads). A batch with an
    ignored target stops at that check: the loss would divide by a count over every sample's label, which
    mixes samples."""
    if "dpcompile_checked_count" not in node.meta:
        from torch._guards import detect_fake_mode

        y = node.args[0].args[0]
        count = node.meta["val"]
        fake_mode = detect_fake_mode([count])
        graph = analysis.graph
        with graph.inserting_after(node):
            size = graph.call_function(aten.sym_size.int, (y, 0))
        size.meta["val"] = y.meta["val"].shape[0]
        with graph.inserting_after(size):
            same = graph.call_function(aten.eq.Scalar, (node, size))
        with fake_mode:
            same.meta["val"] = aten.eq.Scalar(count, size.meta["val"])
        with graph.inserting_after(same):
            graph.call_function(aten._assert_async.msg, (same, _IGNORED_TARGET_MESSAGE))
        node.meta["dpcompile_checked_count"] = analysis.state(y).inner
        for n in (size, same):
            analysis.states[n] = None
    return None


@batchdim_rule(*_ALONG_DIM)
def along_dim(analysis, node: fx.Node) -> State:
    idx = _ALONG_DIM[node.target]
    out_rank = rank_of(node) if rank_of(node) is not None else rank_of(node.args[0])
    d = _norm_dim(_arg(node, idx, -1), out_rank)  # sort / topk default to the last dim
    operands = [a for a in _flatten_nodes((node.args, node.kwargs)) if rank_of(a) == out_rank]
    for a in operands:
        s = analysis.state(a)
        if isinstance(s, BDim) and s.dim == d:
            return analysis._mix(node, "an op acting along the batch dim")
    if any(rank_of(a) not in (None, out_rank) and isinstance(analysis.state(a), BDim)
           for a in _flatten_nodes((node.args, node.kwargs))):
        return analysis._unknown(node, "an op along a dim with operands of different ranks")
    r = analysis._pointwise(node, operands, out_rank)
    if isinstance(node.meta.get("val"), (tuple, list)):  # sort / topk: (values, indices)
        return (r, r)
    return r


@batchdim_rule(aten.native_layer_norm.default)
def layer_norm(analysis, node: fx.Node) -> State:
    x, shape = node.args[:2]
    s = analysis.state(x)
    for w in node.args[2:4]:
        if isinstance(analysis.state(w), BDim):
            return analysis._unknown(node, "layer_norm with per-sample affine parameters")
    if s.dim >= rank_of(x) - len(shape):
        return analysis._mix(node, "a layer_norm normalising over the batch dim")
    return (s, s, s)
