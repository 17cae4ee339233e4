"""Leaf sites: the ops at which a parameter gradient contracts the batch, and how to keep the batch dim there.

A *site* is one such op. `classify_leaf` finds the site kind whose ops match the leaf (the registry of
passes/sites/, one module per kind: linear, rows, embedding, bmm, conv, whole) and lets it build the `Site`;
`Site.fused_inputs` / `Site.per_sample` (called while tracing the replacement) turn its operands into per-sample
views whose dim 0 indexes samples, for the kind's own ops in codegen/ops.py, or materialize the per-sample
contribution (the general fallback).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from ..errors import SymbolicLayoutError, UnsupportedGradientError
from .batchdim import BDim, Mixed, node_location, op_name
from .symbolic import canonical, sym_expr
from .sites import match, site_kind



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
        """The operands of the kind's own norm / clipped-sum ops (samples on dim 0)."""
        return site_kind(self.kind).fused_inputs(self, env, bsz)

    def per_sample(self, env: dict, bsz) -> torch.Tensor:
        """Materialized per-sample contribution, shape (B, *leaf shape)."""
        return site_kind(self.kind).per_sample(self, env, bsz)


def contribution_reads(c) -> list:
    """Every existing graph value a contribution's per-sample form reads (its site's operands, its chain's other
    arguments), in first-use order."""
    seen: dict = {n: None for n in c.site.inputs}
    for step in c.chain:
        for i, a in enumerate(step.node.args):
            if i != step.pos:
                fx.node.map_arg(a, lambda n: seen.setdefault(n, None))
        fx.node.map_arg(step.node.kwargs, lambda n: seen.setdefault(n, None))
    return list(seen)


def numel(node: fx.Node) -> int:
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
    outer = canonical(sympy.cancel(sym_expr(x.shape[dim]) / (sym_expr(bsz) * inner)), shape_env)
    if outer == 1:  # samples outermost (batch-major): one reshape, no merge back (fewer fake ops at compile time)
        return x.reshape(*pre, bsz, int(inner) if inner.is_Integer else -1, *post).movedim(dim, 0)
    if inner.is_Integer:
        y = x.reshape(*pre, -1, bsz, int(inner), *post).movedim(dim + 1, 0)
        return y.reshape(bsz, *pre, -1, *post)
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
    state = st(node)
    if isinstance(state, BDim):
        raise UnsupportedGradientError(
            f"gradient of parameter `{param_name}` still carries the batch at op `{node.name}`{node_location(node)}"
        )
    kind = match(node)
    if kind is not None:
        return kind.classify(node, st, state, param_name)
    raise UnsupportedGradientError(
        f"gradient of parameter `{param_name}` is contracted over the batch by op `{node.name}` "
        f"({op_name(node.target)}){node_location(node)}, which dpcompile cannot compute per "
        f"sample{reason(state)}"
    )


def reason(state) -> str:
    return f" ({state.reason})" if isinstance(state, Mixed) else ""
