"""The chain of a contribution: the ops between a site and its parameter gradient that are linear in the
contribution and do not touch samples (discover.py walks them, `Step`), and their replay, on the batch-free clipped
sum (`replay`) or on per-sample values (`replay_per_sample`). Imported by discover.py, rewrite.py and the site kinds
that replay an inner contribution (sites/mapped.py); imports none of them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import UnsupportedGradientError

aten = torch.ops.aten


@dataclass
class Step:
    """One chain op applied to the contribution: `node` with the contribution at args position `pos`."""

    node: fx.Node
    pos: int


def _arg(env: dict, a):
    return fx.node.map_arg(a, lambda n: env[n])


def replay(step: Step, value, env: dict):
    """The chain op applied to a batch-free value (the clipped sum): the op itself."""
    args = [value if i == step.pos else _arg(env, a) for i, a in enumerate(step.node.args)]
    return step.node.target(*args, **_arg(env, dict(step.node.kwargs)))


def replay_per_sample(step: Step, ps: torch.Tensor, env: dict) -> torch.Tensor:
    """The chain op applied to per-sample values ps (B, *in): returns (B, *out)."""
    n, t = step.node, step.node.target
    B = ps.shape[0]
    r = ps.dim() - 1  # rank of one sample
    a = lambda i: _arg(env, n.args[i])  # noqa: E731
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return ps.reshape(B, *a(1))
    if t is aten.permute.default:
        return ps.permute(0, *[p % r + 1 for p in a(1)])
    if t is aten.t.default:
        return ps.transpose(1, 2) if r == 2 else ps
    if t is aten.transpose.int:
        return ps.transpose(a(1) % r + 1, a(2) % r + 1)
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default):
        return ps.reshape(B, *n.meta["val"].shape)
    if t is aten.expand.default:
        out_rank = n.meta["val"].dim()
        return ps.reshape(B, *([1] * (out_rank - r)), *ps.shape[1:]).expand(B, *a(1))
    if t in (aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default):
        return ps
    if t is torch.ops.prims.convert_element_type.default:
        return ps.to(a(1))
    if t is aten._to_copy.default:
        return ps.to(n.kwargs.get("dtype", ps.dtype))
    if t is aten.neg.default:
        return -ps
    if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        other = a(1 - step.pos)
        out_rank = n.meta["val"].dim()
        if out_rank > r:
            ps = ps.reshape(B, *([1] * (out_rank - r)), *ps.shape[1:])
        return ps * other if t in (aten.mul.Tensor, aten.mul.Scalar) else ps / other
    if t is aten.sum.dim_IntList:
        dims = a(1) or list(range(r))
        keep = bool(a(2)) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
        return ps.sum([d % r + 1 for d in dims], keepdim=keep)
    if t is aten.mm.default:
        return torch.matmul(a(0), ps) if step.pos == 1 else torch.matmul(ps, a(1))
    if t is aten.embedding_dense_backward.default:
        idx, num_weights, pad = a(1), a(2), a(3)
        return _scatter_rows(ps, idx, num_weights, pad, ps.shape[-1:])
    if t in (aten.index_put.default, aten._unsafe_index_put.default):
        base, indices = a(0), a(1)
        if len(indices) != 1 or not (len(n.args) > 3 and n.args[3]):
            raise UnsupportedGradientError(f"unsupported scatter `{n.name}` on a gradient path")
        return _scatter_rows(ps, indices[0], base.shape[0], -1, base.shape[1:])
    if t is aten._unsafe_masked_index_put_accumulate.default:
        base, mask, indices = a(0), a(1), a(2)
        return _scatter_rows(ps * mask, indices[0], base.shape[0], -1, base.shape[1:])
    raise UnsupportedGradientError(f"op `{n.name}` ({t}) cannot be applied per sample")


def _scatter_rows(ps, idx, num_rows, pad, row_shape):
    """Per-sample index_add of rows by batch-free indices (position embeddings and friends)."""
    B = ps.shape[0]
    flat_idx = idx.reshape(-1).long()
    vals = ps.reshape(B, flat_idx.shape[0], *row_shape)
    if pad is not None and pad >= 0:
        keep = (flat_idx != pad).to(vals.dtype).view(1, -1, *([1] * len(row_shape)))
        vals = vals * keep
    out = vals.new_zeros((B, num_rows, *row_shape))
    return out.index_add(1, flat_idx, vals)
