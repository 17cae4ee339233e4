"""Batch-dim rules of ops that keep every dim where it is, or act elementwise up to one dim: identities (copies,
casts, activations and their backwards), factories whose values are batch-free, complex construction, copy, and
padding, tril / triu, repeat_interleave along a dim that does not carry samples. Other ops tagged pointwise need no
rule: the engine broadcasts them (BatchDimAnalysis._pointwise)."""
from __future__ import annotations

import torch.fx as fx

from ..batchdim_states import State, _norm_dim, aten, batchdim_rule, prims
from ..symbolic import rank_of

_IDENTITY_OPS = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
    aten._to_copy.default, aten.lift_fresh_copy.default, prims.convert_element_type.default,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.dropout.default,
    aten.gelu_backward.default, aten.threshold_backward.default, aten.silu_backward.default,
}

_BATCH_FREE_FACTORIES = {
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default, aten.new_full.default, aten.empty_strided.default, aten.new_empty_strided.default, aten.sym_size.int,
    aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
    aten.scalar_tensor.default, aten.full.default, aten.zeros.default, aten.ones.default,
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.empty.memory_format,
    prims.iota.default,
}


@batchdim_rule(*_IDENTITY_OPS)
def identity(analysis, node: fx.Node) -> State:
    return analysis.state(node.args[0])


@batchdim_rule(*_BATCH_FREE_FACTORIES)
def batch_free(analysis, node: fx.Node) -> State:
    return None


@batchdim_rule(aten.polar.default, aten.complex.default)
def complex_pointwise(analysis, node: fx.Node) -> State:
    return analysis._pointwise(node)


@batchdim_rule(aten.copy.default)
def copy(analysis, node: fx.Node) -> State:
    """copy(self, src): src's values broadcast to self's shape (and dtype); self gives only the shape."""
    return analysis._pointwise(node, [node.args[1]])


@batchdim_rule(aten.constant_pad_nd.default)
def pad(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    pad = node.args[1]
    rank = rank_of(node.args[0])
    padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    if s.dim in padded:
        return analysis._mix(node, "padding along the batch dim")
    return s


@batchdim_rule(aten.tril.default, aten.triu.default)
def last_two_dims(analysis, node: fx.Node) -> State:
    # tril / triu act on the last two dims
    s = analysis.state(node.args[0])
    if s.dim >= rank_of(node.args[0]) - 2:
        return analysis._mix(node, "a triangular mask over the batch dim")
    return s


@batchdim_rule(aten.repeat_interleave.self_int)
def repeat_interleave(analysis, node: fx.Node) -> State:
    s = analysis.state(node.args[0])
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if d is None or _norm_dim(d, rank_of(node.args[0])) == s.dim:
        return analysis._mix(node, "repeat_interleave over the batch dim")
    return s
