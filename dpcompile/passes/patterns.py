"""Leaf patterns: the ops at which a parameter gradient contracts the batch, and how to keep the batch dim there.

A *site* is one such op. `classify_leaf` recognises it; `Site.per_sample_*` (called while tracing the
replacement) turns its operands into per-sample views whose dim 0 indexes samples, for the custom ops in
codegen/ops.py, or materializes the per-sample contribution (the general fallback).

Known sites after the decomposition table in backend.py:
  linear     mm(A, B) with samples along the contracted dim  (Linear / Conv1D / MHA in_proj, any x @ W)
  rows       sum over dims that include the batch dim         (bias, LayerNorm/RMSNorm affine, elementwise params)
  embedding  embedding_dense_backward / index_put(accumulate) with per-sample or positional indices
  bmm        bmm with samples along the contracted dim         (materialized)
  conv       convolution_backward weight / bias outputs        (materialized: batch folded into groups)
  whole      B == 1: the value itself is sample 0's contribution (materialized)
"""
from __future__ import annotations

import operator

from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from ..errors import SymbolicLayoutError, UnsupportedGradientError
from .batchdim import BDim, Mixed, canonical, node_location, rank_of, sym_expr

aten = torch.ops.aten

FUSED_KINDS = ("linear", "rows", "embedding")
_ZERO_FACTORIES = {aten.full.default, aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}


@dataclass
class Site:
    kind: str
    node: fx.Node
    operands: dict  # role -> fx.Node
    layouts: dict  # role -> (dim, BDim) : the dim of that operand that carries samples and its layout
    info: dict = field(default_factory=dict)

    @property
    def inputs(self) -> list[fx.Node]:
        return list(self.operands.values())

    # -- traced helpers (run on fake tensors under make_fx) -------------------------------------------------
    def split(self, role: str, env: dict, bsz) -> torch.Tensor:
        """The operand with its sample dim split out to dim 0: (B, *pre, T', *post)."""
        dim, layout = self.layouts[role]
        return split_samples(env[self.operands[role]], dim, layout, bsz, self.node)

    def fused_inputs(self, env: dict, bsz) -> tuple:
        if self.kind == "linear":
            a = self.split("rows_a", env, bsz).transpose(1, 2)  # A is (M, K): (B, M, T') -> (B, T', M)
            b = self.split("rows_b", env, bsz)
            return a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
        if self.kind == "rows":
            x = self.split("x", env, bsz)
            reduced, kept = self.info["reduced_pos"], self.info["kept_pos"]
            x = x.permute(0, *reduced, *kept)
            return (x.reshape(x.shape[0], -1, _numel(self.node)),)
        if self.kind == "embedding":
            g = self.split("grad", env, bsz)
            if "idx" in self.layouts:
                idx = self.split("idx", env, bsz)
            else:  # positional ids shared by every sample (position embeddings)
                idx = env[self.operands["idx"]].reshape(1, -1).expand(bsz, -1)
            if "mask" in self.operands:
                g = g * self.split("mask", env, bsz).to(g.dtype)
            return idx.reshape(idx.shape[0], -1), g.reshape(g.shape[0], -1, self.info["width"])
        raise AssertionError(self.kind)

    def per_sample(self, env: dict, bsz) -> torch.Tensor:
        """Materialized per-sample contribution, shape (B, *leaf shape)."""
        shape = list(self.node.meta["val"].shape)
        if self.kind == "linear":
            a, b = self.fused_inputs(env, bsz)
            return torch.bmm(a.transpose(1, 2), b)
        if self.kind == "rows":
            (x,) = self.fused_inputs(env, bsz)
            return x.sum(1).reshape(x.shape[0], *shape)
        if self.kind == "embedding":
            idx, g = self.fused_inputs(env, bsz)
            B, T = idx.shape
            V = self.info["num_weights"]
            pad = self.info["padding_idx"]
            if pad >= 0:
                g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
            rows = torch.arange(B, device=idx.device).view(B, 1).expand(B, T)
            out = g.new_zeros((B, V, g.shape[-1]))
            out = out.index_put((rows, idx.long()), g, accumulate=True)
            return out.reshape(B, *shape)
        if self.kind == "bmm":
            a = self.split("rows_a", env, bsz)  # A (n, M, K) -> (B, n, M, T')
            b = self.split("rows_b", env, bsz)  # B (n, K, N) -> (B, n, T', N)
            return torch.einsum("bnmt,bntk->bnmk", a, b)
        if self.kind == "whole":
            return env[self.operands["x"]].unsqueeze(0)
        if self.kind == "conv":
            return _conv_per_sample(self, env, bsz)
        raise AssertionError(self.kind)


def _numel(node: fx.Node) -> int:
    n = 1
    for s in node.meta["val"].shape:
        n = n * s
    return n


def split_samples(x: torch.Tensor, dim: int, layout: BDim, bsz, where: fx.Node) -> torch.Tensor:
    """(…, outer*B*inner, …) -> (B, …, outer*inner, …): sample (i // inner) % B of dim `dim` moved to dim 0.

    One of outer and inner must be a number (or both symbolic sizes must be provably equal to a number): the
    reshape then writes that one and infers the other (-1) from the tensor, so B and the sequence length may both
    be symbolic. Both symbolic (e.g. a time-major layout of a dynamic length with per-sample blocks of another
    dynamic size) cannot be written as one reshape without guarding on a size: refused (SymbolicLayoutError),
    and dpcompile.compile recompiles that shape with static sizes."""
    pre, post = list(x.shape[:dim]), list(x.shape[dim + 1:])
    shape_env = _shape_env(x.shape[dim], bsz)
    inner = canonical(layout.inner, shape_env)
    if inner.is_Integer:
        y = x.reshape(*pre, -1, bsz, int(inner), *post).movedim(dim + 1, 0)
        return y.reshape(bsz, *pre, -1, *post)
    outer = canonical(sympy.cancel(sym_expr(x.shape[dim]) / (sym_expr(bsz) * inner)), shape_env)
    if outer.is_Integer:
        y = x.reshape(*pre, int(outer), bsz, -1, *post).movedim(dim + 1, 0)
        return y.reshape(bsz, *pre, -1, *post)
    raise SymbolicLayoutError(
        f"cannot split samples out of dim {dim} of a {list(x.shape)} tensor at `{where.name}`"
        f"{node_location(where)}: samples are interleaved with blocks of {inner} elements repeated {outer} times, "
        "and both sizes are symbolic"
    )


def _shape_env(*sizes):
    for s in sizes:
        if isinstance(s, torch.SymInt):
            return s.node.shape_env
    return None


# ----------------------------------------------------------------------------------------------------------
# classification


def classify_leaf(node: fx.Node, st, param_name: str) -> Site:
    """The site for a leaf node, or an error that names the parameter and the op. `st`: node -> batch state."""
    t = node.target
    state = st(node)
    if isinstance(state, BDim):
        raise UnsupportedGradientError(
            f"gradient of parameter `{param_name}` still carries the batch at op `{node.name}`{node_location(node)}"
        )
    if t is aten.mm.default:
        return _mm_site(node, st, state, param_name)
    if t in (aten.sum.dim_IntList, aten.sum.default):
        return _sum_site(node, st, state, param_name)
    if t is aten.embedding_dense_backward.default:
        return _embedding_site(node, st, param_name)
    if t in (aten.index_put.default, aten._unsafe_index_put.default, aten._unsafe_masked_index_put_accumulate.default):
        return _index_put_site(node, st, param_name)
    if t is aten.bmm.default:
        return _bmm_site(node, st, param_name)
    if t is operator.getitem and getattr(node.args[0], "target", None) is aten.convolution_backward.default:
        return _conv_site(node, param_name)
    raise UnsupportedGradientError(
        f"gradient of parameter `{param_name}` is contracted over the batch by op `{node.name}` "
        f"({getattr(t, '__name__', t)}){node_location(node)}, which dpcompile cannot compute per sample"
        f"{_reason(state)}"
    )


def _reason(state) -> str:
    return f" ({state.reason})" if isinstance(state, Mixed) else ""


def _mm_site(node, st, state, name) -> Site:
    a, b = node.args[:2]
    sa, sb = st(a), st(b)
    # rows view of A: A is (M, K); rows_a = A^T (K, M)
    layout_a = BDim(0, sa.inner) if isinstance(sa, BDim) and sa.dim == 1 else None
    layout_b = BDim(0, sb.inner) if isinstance(sb, BDim) and sb.dim == 0 else None
    if layout_a and layout_b and layout_a != layout_b:
        raise UnsupportedGradientError(f"matmul `{node.name}` for `{name}` pairs different sample layouts")
    layout = layout_a or layout_b
    if layout is None:
        raise UnsupportedGradientError(
            f"gradient of parameter `{name}` mixes samples at matmul `{node.name}`{node_location(node)}{_reason(state)}"
        )
    return Site("linear", node, {"rows_a": a, "rows_b": b}, {"rows_a": (1, layout), "rows_b": (0, layout)},
                {"transpose_a": True})


def _bmm_site(node, st, name) -> Site:
    a, b = node.args[:2]
    sa, sb = st(a), st(b)
    layout = sa if isinstance(sa, BDim) and sa.dim == 2 else sb if isinstance(sb, BDim) and sb.dim == 1 else None
    if layout is None:
        raise UnsupportedGradientError(f"gradient of parameter `{name}` mixes samples at bmm `{node.name}`{node_location(node)}")
    return Site("bmm", node, {"rows_a": a, "rows_b": b}, {"rows_a": (2, BDim(2, layout.inner)), "rows_b": (1, BDim(1, layout.inner))})


def _sum_site(node, st, state, name) -> Site:
    x = node.args[0]
    sx = st(x)
    if not isinstance(sx, BDim):
        raise UnsupportedGradientError(f"gradient of parameter `{name}` mixes samples at `{node.name}`{node_location(node)}{_reason(state)}")
    rank = rank_of(x)
    dims = node.args[1] if node.target is aten.sum.dim_IntList and len(node.args) > 1 else None
    dims = list(range(rank)) if not dims else [d + rank if d < 0 else d for d in dims]
    # positions in the split tensor (B, *pre, T', *post): old dim j -> j + 1
    reduced = sorted(d + 1 for d in dims)
    kept = [d + 1 for d in range(rank) if d not in dims]
    return Site("rows", node, {"x": x}, {"x": (sx.dim, sx)}, {"reduced_pos": reduced, "kept_pos": kept})


def _embedding_site(node, st, name) -> Site:
    grad, idx, num_weights, padding_idx, scale_by_freq = node.args[:5]
    if scale_by_freq:
        raise UnsupportedGradientError(
            f"embedding for `{name}` uses scale_grad_by_freq, which scales each gradient by counts over the whole "
            "batch and so mixes samples; turn it off"
        )
    return _index_site(node, name, st, idx, grad, None, num_weights, padding_idx, grad.meta["val"].shape[-1])


def _index_put_site(node, st, name) -> Site:
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
    idx = indices[0]
    return _index_site(node, name, st, idx, values, mask, base_shape[0], -1, width)


def _conv_site(node, name) -> Site:
    conv = node.args[0]
    grad, x, w = conv.args[:3]
    stride, padding, dilation, transposed, output_padding, groups = conv.args[4:10]
    if transposed:
        raise UnsupportedGradientError(
            f"gradient of `{name}` comes from a transposed convolution at `{conv.name}`{node_location(conv)}, "
            "which dpcompile cannot compute per sample yet")
    which = {1: "weight", 2: "bias"}.get(node.args[1])
    if which is None:
        raise UnsupportedGradientError(f"gradient of `{name}` is the input gradient of `{conv.name}`")
    return Site("conv", node, {"grad": grad, "x": x, "w": w}, {},
                {"which": which, "stride": stride, "padding": padding, "dilation": dilation,
                 "output_padding": output_padding, "groups": groups})


def _conv_per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    """Per-sample convolution parameter gradients, (B, *shape): the batch folded into the channel groups."""
    g, x, w = (env[site.operands[k]] for k in ("grad", "x", "w"))
    if site.info["which"] == "bias":
        return g.sum(list(range(2, g.dim())))
    i = site.info
    x1 = x.reshape(1, -1, *x.shape[2:])  # (1, B*Cin, *S)
    g1 = g.reshape(1, -1, *g.shape[2:])  # (1, B*Cout, *S')
    w1 = w.repeat(bsz, *([1] * (w.dim() - 1)))  # (B*Cout, Cin/G, *k)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g1, x1, w1, None, i["stride"], i["padding"], i["dilation"], False, i["output_padding"],
        i["groups"] * bsz, [False, True, False])
    return gw.reshape(bsz, *w.shape)


def _is_zero_fill(node: fx.Node) -> bool:
    if node.target is aten.full.default:
        return node.args[1] == 0
    if node.target is aten.new_zeros.default or node.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    return False


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
