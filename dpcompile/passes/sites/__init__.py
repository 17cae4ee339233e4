"""The site-kind registry: one `SiteKind` record per kind of op at which a parameter gradient contracts the batch.

Each kind lives in its own module here (linear.py, rows.py, embedding.py, bmm.py, conv.py, whole.py) and declares,
next to each other: which aten ops it matches and how it classifies a leaf (a `Site`), its per-sample materialized
form, and, if it is fused, its fused inputs and its norm / clipped-sum ops. The pass looks kinds up by name
(`site_kind`) or by node (`match`); FUSED_KINDS and the like are derived from the records. User code registers a
kind with `register_site_kind` (tests/test_extending.py does; docs/extending.md walks through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.fx as fx

from ...registry import Registry


@dataclass(frozen=True)
class SiteKind:
    """name: Site.kind of its sites, and what explain prints (`name(aten op)`, strategy `fused-<name>`).
    targets: the aten ops (node.target) it matches; `matches(node) -> bool` instead, for a test on more than the
        target (conv: a getitem of convolution_backward).
    classify: (node, st, state, param_name) -> Site, or raises UnsupportedGradientError naming the parameter and
        the node; st(node) is a node's batch state, `state` the leaf's.
    per_sample: (site, env, bsz) -> the (B, *leaf shape) per-sample contributions, plain PyTorch (traced): all the
        materialize strategy needs.
    fused_inputs: (site, env, bsz) -> the operands of its own norm / clipped-sum ops (samples on dim 0); None for
        a kind that is only materialized.
    norm: (site, ins, strategy, pg, env, randomized) -> (squared norms (B,), what clipped_sum reads).
    clipped_sum: (site, prepared, coef, strategy) -> sum_i coef_i g_i, shaped like the leaf.
    strategies: the linear strategies of the strategy registry apply (the planner costs them per site).
    absorb: (contribution, batch_size) -> a contribution of this kind, or None: recognises a chain of other ops
        as one of its sites after classification (embedding: a sum over the batch, then a scatter by ids every
        sample shares, is a position embedding).
    keeps_node: the site is the gradient value itself (B == 1), which the replacement reads: the coverage check
        does not ask for it to be gone.
    column_sums: (site, env, bsz) -> (B, P) per-sample column sums: the site's squared norm is each row's sum of
        squares and its clipped sum the coef-weighted sum of the rows, shaped like the site's node. A group's sites
        of such a kind (unit scale, at most two) share one op with the group's clip factor (rewrite.py,
        codegen.ops.rows_group_clipped_sum).
    combine: (param_grad, batch_size, budget_bytes, DeviceModel) -> (one contribution of this kind, {strategy:
        sympy seconds} with "materialize" among them, the bytes materializing would hold), or None: recognises
        several contributions of one parameter as one site of this kind (tied_embedding: a table that is also the
        LM head). The planner takes the cheapest strategy (materialize only where its bytes fit the scratch
        budget) and, unless it is materialize, replaces the contributions with the one returned. Its Site lists
        the original nodes it stands for in info["originals"] (the coverage check asks for all of them to be gone).
    """

    name: str
    classify: Callable
    per_sample: Callable
    targets: tuple = ()
    matches: Optional[Callable] = None
    fused_inputs: Optional[Callable] = None
    norm: Optional[Callable] = None
    clipped_sum: Optional[Callable] = None
    strategies: bool = False
    absorb: Optional[Callable] = None
    keeps_node: bool = False
    combine: Optional[Callable] = None
    column_sums: Optional[Callable] = None

    def __post_init__(self):
        if self.fused_inputs is not None and (self.norm is None or self.clipped_sum is None):
            raise ValueError(f"site kind {self.name!r} has fused inputs: it needs norm and clipped_sum ops")

    @property
    def fused(self) -> bool:
        return self.fused_inputs is not None

    def match(self, node: fx.Node) -> bool:
        return node.target in self.targets or (self.matches is not None and bool(self.matches(node)))


_KINDS = Registry("site kind")
register_site_kind = _KINDS.register  # (kind, replace=False)
unregister_site_kind = _KINDS.unregister
site_kind = _KINDS.get


def kinds() -> list:
    return _KINDS.values()


def match(node: fx.Node) -> Optional[SiteKind]:
    """The kind whose ops match `node` (the most recently registered first, so user code can take over an op)."""
    return next((k for k in reversed(_KINDS.values()) if k.match(node)), None)


def fused_kinds() -> tuple:
    """The kinds with their own norm and clipped-sum ops (the others are materialized)."""
    return tuple(k.name for k in _KINDS.values() if k.fused)
