"""bmm: bmm(A, B) with samples along the contracted dim (materialized: per-sample einsum)."""
from __future__ import annotations

import torch

from ...errors import UnsupportedGradientError
from ..batchdim import BDim, node_location
from ..patterns import Site
from . import SiteKind, register_site_kind


def classify(node, st, state, name) -> Site:
    a, b = node.args[:2]
    sa, sb = st(a), st(b)
    layout = sa if isinstance(sa, BDim) and sa.dim == 2 else sb if isinstance(sb, BDim) and sb.dim == 1 else None
    if layout is None:
        raise UnsupportedGradientError(
            f"gradient of parameter `{name}` mixes samples at bmm `{node.name}`{node_location(node)}")
    return Site("bmm", node, {"rows_a": a, "rows_b": b},
                {"rows_a": (2, BDim(2, layout.inner)), "rows_b": (1, BDim(1, layout.inner))})


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    a = site.split("rows_a", env, bsz)  # A (n, M, K) -> (B, n, M, T')
    b = site.split("rows_b", env, bsz)  # B (n, K, N) -> (B, n, T', N)
    return torch.einsum("bnmt,bntk->bnmk", a, b)


KIND = register_site_kind(SiteKind("bmm", classify, per_sample, targets=(torch.ops.aten.bmm.default,)),
                          replace=True)
