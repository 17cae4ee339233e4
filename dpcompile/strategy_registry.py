"""The strategy registry: one `Strategy` record per way of getting a site's per-sample norms and clipped sum.

Everything that names strategies reads them from here: the values options.py accepts for `strategy` (and the
CLI's `--strategy`), the planner's candidates and costs (passes/plan.py), the ops the rewrite calls
(passes/rewrite.py) and the costs `explain` prints. The built-in records are in passes/strategies.py; user code
registers its own with `register_strategy` (tests/test_extending.py does).

This module imports only dpcompile/registry.py, so options.py (below the pass in the layer order) can read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .registry import Registry

#: how the privacy analysis accounts for a strategy whose norms are not exact. Only one is known to the optimizer
#: and accountant: "randomized" (probe-estimated norms, the graph records its probes: docs/randomized.md).
ACCOUNTINGS = ("randomized",)
#: where each accounting is described (messages that refuse a non-exact strategy point there)
ACCOUNTING_DOCS = {"randomized": "docs/randomized.md"}


@dataclass(frozen=True)
class Strategy:
    """name: what `strategy` options, explain and the rewrite call it.
    kind: the site kind it applies to ("linear"), or None for every kind (materialize).
    exact: the per-sample norms are exact. A strategy that is not is never chosen by "auto" and must name its
        `accounting` (one of ACCOUNTINGS).
    cost: (LinearShape, budget_bytes, DeviceModel, probes) -> seconds as a sympy expression in the graph's sizes,
        or None (not costed: an internal form of another strategy).
    norm: (ins, pg, env, randomized) -> (squared norms (B,), what `clipped_sum` reads), traced into the graph;
        ins: the site's fused inputs.
    clipped_sum: (what norm returned, coef) -> sum_i coef_i g_i.
    norm_rows: (ins, pg, env) -> (the squared norms as (B, K) parts each sample's norm is the sum of, what
        `clipped_sum` reads), or None. A group of such a site and its rows sites (a linear layer's weight and
        bias) hands the parts to the rows op (codegen.ops.rows_group_clipped_sum), which sums them into the factor
        with the rows sites' own norms (no reduction of its own) and forms the rows sites' clipped sums.
    group_clip: (a, b, rest_sq, sq_scale, threshold, clip_fn, mean, budget_bytes) -> (sum, coef): the strategy
        forms the group's clip factors itself (single_pass), so at most one site of a group takes it.
    option: users may name it (`strategy=...`); False for the internal forms the rewrite dispatches on.
    requires: conditions under which "auto" may choose it, by name: "scratch_fits" (the per-sample products fit
        the single-pass budget at the compiled batch), "keeps_no_more" (the products take no more memory than the
        operands, M N <= T (M + N)).
    keeps_products: the products are formed and kept until the group's factor is known (stored, single_pass).
    chunked / within_budget / stored: the internal strategy the rewrite runs instead when the site's products
        exceed the budget / fit it / may be kept (as stored keeps them).
    factor_apart: for a group_clip strategy, the strategy of the same products and traffic whose factor is formed
        apart, which the rewrite runs where the group's rows sites form the factor in one launch with their sums
        (codegen.ops.rows_group_clipped_sum); without one, such a group keeps the rows sites' own ops.
    check: (parameter name, LinearShape) -> None or raises OptionsError, for a site this strategy is forced on.
    runtime_threshold: its ops can read the group's threshold as a tensor of the graph (max_grad_norm="adaptive");
        False for a group_clip op that takes it as a number: the planner never gives it to run-time thresholds.
    """

    name: str
    kind: Optional[str] = "linear"
    exact: bool = True
    cost: Optional[Callable] = None
    norm: Optional[Callable] = None
    clipped_sum: Optional[Callable] = None
    norm_rows: Optional[Callable] = None
    group_clip: Optional[Callable] = None
    accounting: Optional[str] = None
    option: bool = True
    requires: tuple = ()
    keeps_products: bool = False
    chunked: Optional[str] = None
    within_budget: Optional[str] = None
    stored: Optional[str] = None
    factor_apart: Optional[str] = None
    check: Optional[Callable] = None
    runtime_threshold: bool = True
    doc: str = ""

    def __post_init__(self):
        if not self.exact and self.accounting not in ACCOUNTINGS:
            raise ValueError(f"strategy {self.name!r} is not exact: it must declare its accounting, one of "
                             f"{ACCOUNTINGS} (got {self.accounting!r})")
        if self.exact and self.accounting is not None:
            raise ValueError(f"strategy {self.name!r} is exact: it has no accounting of its own")
        if self.group_clip is None and (self.norm is None or self.clipped_sum is None):
            raise ValueError(f"strategy {self.name!r} needs norm and clipped_sum ops (or group_clip)")
        if self.name == "auto":
            raise ValueError("'auto' is the planner's choice, not a strategy")

    def op_strategy(self, chunked: bool, stored_products: bool) -> str:
        """The strategy the rewrite runs for a site given this one by the planner."""
        if stored_products and self.stored:
            return self.stored
        if chunked:
            return self.chunked or self.name
        return self.within_budget or self.name


_STRATEGIES = Registry("strategy")
register_strategy = _STRATEGIES.register  # (strategy, replace=False): user code may call it before compiling
unregister_strategy = _STRATEGIES.unregister
get_strategy = _STRATEGIES.get
find_strategy = _STRATEGIES.find  # None for a name that is not a record ("auto", a kind's own "fused-rows", "zero")


def strategies(kind: Optional[str] = "linear") -> list:
    """The registered strategies of one site kind, in registration order."""
    return [s for s in _STRATEGIES.values() if s.kind == kind]


def option_names(kind: str = "linear") -> tuple:
    """The names `strategy` options accept (besides "auto")."""
    return tuple(s.name for s in strategies(kind) if s.option)


def exact_option_names(kind: str = "linear") -> tuple:
    return tuple(s.name for s in strategies(kind) if s.option and s.exact)


def inexact_names(kind: str = "linear") -> tuple:
    """Strategies whose norms are estimates: costed for explain only where the user forced one."""
    return tuple(s.name for s in strategies(kind) if not s.exact)
