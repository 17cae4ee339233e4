"""Batch-dim rules of embeddings: embedding (the table is batch-free, the ids carry samples), its dense backward
(sums over samples: a site, sites/embedding.py), and embedding bags, accepted only where each bag is one sample
(sites/embedding_bag.py)."""
from __future__ import annotations

import sympy
import torch.fx as fx

from ..batchdim_states import BDim, State, _arg, aten, batchdim_rule, prims
from ..symbolic import _provably_positive, rank_of, sizes_of, statically_equal, sym_expr


@batchdim_rule(aten.embedding.default)
def embedding(analysis, node: fx.Node) -> State:
    weight, idx = node.args[:2]
    if isinstance(analysis.state(weight), BDim):
        return analysis._unknown(node, "an embedding whose table carries samples")
    s = analysis.state(idx)
    return BDim(s.dim, s.inner) if isinstance(s, BDim) else None


@batchdim_rule(aten.embedding_dense_backward.default)
def embedding_backward(analysis, node: fx.Node) -> State:
    grad, idx = node.args[:2]
    if isinstance(analysis.state(idx), BDim) or isinstance(analysis.state(grad), BDim):
        return analysis._mix(node, "an embedding gradient summed over the batch")
    return None


@batchdim_rule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(analysis, node: fx.Node) -> State:
    """_embedding_bag(weight, indices, offsets, ...) with one bag per sample: 1-D indices holding L per sample
    (BDim(0, L): a (B, L) input flattened) and offsets = iota(B, start=0, step=L), which nn.EmbeddingBag builds
    for a 2-D input. Bag b is then exactly sample b's L indices. Any other offsets (a user's 1-D input with its
    own offsets) may put several samples in one bag: unknown."""
    weight, idx, offsets = node.args[:3]
    include_last = _arg(node, 7, False)
    si, psw = analysis.state(idx), _arg(node, 6)
    if analysis.state(weight) is not None or analysis.state(offsets) is not None or include_last \
            or not isinstance(si, BDim) or si.dim != 0 or rank_of(idx) != 1:
        return analysis._unknown(node, "an embedding bag whose bags are not one per sample")
    if psw is not None and analysis.state(psw) not in (None, si):
        return analysis._unknown(node, "an embedding bag with per-sample weights laid out unlike its indices")
    if not bags_are_samples(analysis, idx, offsets):
        return analysis._unknown(node, "an embedding bag whose bags are not one per sample (its offsets are not those "
                                 "nn.EmbeddingBag builds for a 2-D input, one bag of L ids per sample)")
    env, bags, n_idx = analysis.shape_env, sizes_of(offsets)[0], sizes_of(idx)[0]
    outs = []
    for v in node.meta["val"]:
        if v.dim() == 0:
            return analysis._unknown(node, "an embedding bag output of an unexpected size")
        size = sym_expr(v.shape[0])
        if size == 0:
            outs.append(None)  # an output this mode does not fill
        elif statically_equal(size, bags, env):
            outs.append(BDim(0))
        elif statically_equal(size, n_idx, env):
            outs.append(BDim(0, si.inner))
        else:
            return analysis._unknown(node, "an embedding bag output of an unexpected size")
    return tuple(outs)


def bags_are_samples(analysis, idx, offsets) -> bool:
    """Bag b holds exactly sample b's indices: 1-D indices BDim(0, L) of B*L elements, offsets a batch-free
    iota(B, start=0, step=L)."""
    si, env = analysis.state(idx), analysis.shape_env
    if not isinstance(si, BDim) or si.dim != 0 or rank_of(idx) != 1 or analysis.state(offsets) is not None:
        return False
    if not (isinstance(offsets, fx.Node) and offsets.target is prims.iota.default
            and offsets.kwargs.get("start", None) == 0 and isinstance(offsets.kwargs.get("step"), (int, fx.Node))):
        return False
    step = offsets.kwargs["step"]
    step = sym_expr(step.meta["val"]) if isinstance(step, fx.Node) else sympy.Integer(step)
    return statically_equal(step, si.inner, env) and statically_equal(sizes_of(idx)[0], analysis.B * si.inner, env) \
        and is_batch_count(analysis, sizes_of(offsets)[0])


@batchdim_rule(aten._embedding_bag_backward.default)
def embedding_bag_backward(analysis, node: fx.Node) -> State:
    """The weight gradient of an embedding bag sums over bags: over samples where bags are samples (a site,
    sites/embedding_bag.py), else unknown."""
    grad, idx = node.args[:2]
    if node.target is aten._embedding_bag_backward.default and bags_are_samples(analysis, idx, node.args[2]) \
            and analysis.state(grad) == BDim(0):
        return analysis._mix(node, "an embedding-bag gradient summed over the batch")
    return analysis._unknown(node, "an embedding-bag gradient whose bags are not one per sample")


def is_batch_count(analysis, size) -> bool:
    """size == B for every size: also as ceil(B*L / L) = FloorDiv(B*L + L - 1, L), L >= 1 (arange's length)."""
    from torch.utils._sympy.functions import FloorDiv

    if statically_equal(size, analysis.B, analysis.shape_env):
        return True
    if isinstance(size, FloorDiv):
        num, den = size.args
        rest = sympy.expand(num - analysis.B * den)
        return (rest == 0 or sympy.expand(rest - den + 1) == 0) and _provably_positive(den, analysis.shape_env)
    return False
