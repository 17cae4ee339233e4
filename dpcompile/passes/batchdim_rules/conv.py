"""Batch-dim rules of convolution and pooling: samples must be on a leading dim (dim 0 for a convolution); the
weight (and bias) gradient of a convolution sums over samples."""
from __future__ import annotations

import torch.fx as fx

from ..batchdim_states import BDim, State, _arg, _flatten_nodes, _packet_name, aten, batchdim_rule
from ..symbolic import rank_of

# pooling ops and their backwards, by overload packet name (Inductor's prims are registered only once Inductor is
# imported) -> the number of spatial dims (None: the length of the kernel_size argument, args[1])
_POOLS = {
    "_low_memory_max_pool_with_offsets": None, "_low_memory_max_pool_offsets_to_indices": None,
    **{f"{name}{d}d{suffix}": d for d in (1, 2, 3) for name, suffix in (
        ("max_pool", "_with_indices"), ("max_pool", "_with_indices_backward"), ("avg_pool", ""),
        ("avg_pool", "_backward"), ("_adaptive_avg_pool", ""), ("_adaptive_avg_pool", "_backward"),
        ("adaptive_max_pool", ""), ("adaptive_max_pool", "_backward"))},
}


@batchdim_rule(aten.convolution.default)
def convolution(analysis, node: fx.Node) -> State:
    # convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w = node.args[:2]
    s = analysis.state(x)
    if isinstance(analysis.state(w), BDim) or not isinstance(s, BDim) or s.dim != 0 or s.inner != 1:
        return analysis._unknown(node, "a convolution whose samples are not dim 0 of its input")
    return BDim(0)


@batchdim_rule(aten.convolution_backward.default)
def convolution_backward(analysis, node: fx.Node) -> State:
    # (grad_input, grad_weight, grad_bias): the weight and bias gradients sum over samples
    grad, x, w = node.args[:3]
    for a in (grad, x):
        s = analysis.state(a)
        if s is not None and (not isinstance(s, BDim) or s.dim != 0 or s.inner != 1):
            return analysis._unknown(node, "a convolution backward whose samples are not dim 0")
    if isinstance(analysis.state(w), BDim):
        return analysis._unknown(node, "a convolution with per-sample weights")
    summed = analysis._mix(node, "a convolution weight gradient summed over the batch")
    return (BDim(0), summed, summed)


@batchdim_rule(packets=_POOLS, overload="default")
def pool(analysis, node: fx.Node) -> State:
    """Pooling and its backward act on each plane of the last len(kernel_size) (spatial) dims on its own (max
    pool indices are offsets within a plane): samples must sit on a leading dim, the same one in every operand."""
    n_spatial = _POOLS[_packet_name(node.target)]
    if n_spatial is None:
        n_spatial = len(_arg(node, 1))
    out_rank = rank_of(node.args[0])
    operands = [a for a in _flatten_nodes((node.args, node.kwargs)) if isinstance(analysis.state(a), BDim)]
    for a in operands:
        if rank_of(a) != out_rank or analysis.state(a).dim >= out_rank - n_spatial:
            return analysis._unknown(node, "a pooling whose samples are not on a leading dim")
    found = analysis._pointwise(node, operands, out_rank)
    if isinstance(node.meta.get("val"), (tuple, list)):
        return tuple(found for _ in node.meta["val"])
    return found
