"""whole: B == 1, the gradient value itself is sample 0's contribution (materialized). Not matched by any op: the
batch-of-one path (passes/one_sample.py) builds these sites with `site_of`."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import UnsupportedGradientError
from ..patterns import Site
from . import SiteKind, register_site_kind


def site_of(grad: fx.Node) -> Site:
    return Site(KIND.name, grad, {"x": grad}, {})


def classify(node, st, state, name) -> Site:
    raise UnsupportedGradientError(f"`{name}`: a whole-gradient site is only built for batches of one")


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    return env[site.operands["x"]].unsqueeze(0)


KIND = register_site_kind(SiteKind("whole", classify, per_sample, keeps_node=True), replace=True)
