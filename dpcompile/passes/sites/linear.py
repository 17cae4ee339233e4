"""linear: mm(A, B) with samples along the contracted dim (Linear / Conv1D / MHA in_proj, any x @ W).

Fused: a (B, T, M), b (B, T, N), s_i = a_i^T b_i; its norm and clipped-sum ops are those of the site's strategy
(the strategy registry: direct, ghost, single_pass, stored, two_pass, randomized), which the planner chooses."""
from __future__ import annotations

import torch

from ...errors import UnsupportedGradientError
from ...strategy_registry import get_strategy
from ..batchdim import BDim, node_location
from ..patterns import Site, reason
from . import SiteKind, register_site_kind


def classify(node, st, state, name) -> Site:
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
            f"gradient of parameter `{name}` mixes samples at matmul `{node.name}`{node_location(node)}{reason(state)}"
        )
    return Site("linear", node, {"rows_a": a, "rows_b": b}, {"rows_a": (1, layout), "rows_b": (0, layout)},
                {"transpose_a": True})


def fused_inputs(site: Site, env: dict, bsz) -> tuple:
    a = site.split("rows_a", env, bsz).transpose(1, 2)  # A is (M, K): (B, M, T') -> (B, T', M)
    b = site.split("rows_b", env, bsz)
    return _rows3(a), _rows3(b)


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """(B, T', width): the rows of a split operand (already 3-D for a 2-D operand: no view op to trace)."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    a, b = fused_inputs(site, env, bsz)
    return torch.bmm(a.transpose(1, 2), b)


def norm(site, ins, strategy, pg, env, randomized):
    return get_strategy(strategy or "direct").norm(ins, pg, env, randomized)


def clipped_sum(site, prepared, coef, strategy):
    return get_strategy(strategy or "direct").clipped_sum(prepared, coef)


KIND = register_site_kind(SiteKind(
    "linear", classify, per_sample, targets=(torch.ops.aten.mm.default,), fused_inputs=fused_inputs, norm=norm,
    clipped_sum=clipped_sum, strategies=True), replace=True)
