"""The pass extended from outside the package (docs/extending.md does exactly this): a new fused site kind and a
new linear strategy, each registered from this file with its own ops, compiled and checked against the float64
oracle. Nothing in dpcompile/ names them."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import models
from dp_check import assert_matches
from dpcompile import OptionsError, explain
from dpcompile.codegen.registry import dp_op
from dpcompile.errors import UnsupportedGradientError
from dpcompile.passes.batchdim import BDim, node_location
from dpcompile.passes.patterns import Site
from dpcompile.passes.sites import SiteKind, register_site_kind, site_kind, unregister_site_kind
from dpcompile.strategy_registry import Strategy, get_strategy, register_strategy, unregister_strategy

aten = torch.ops.aten


# ---- a site kind: bmm with samples along the contracted dim, fused (the built-in `bmm` kind materializes) ----
# per-sample operands a (B, n, M, T), b (B, n, T, N); s_i = a_i @ b_i, shape (n, M, N)

def _acc(*xs: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in {x.dtype for x in xs} else torch.float32


@dp_op(role="norm")
def ext_bmm_norm(a: Tensor, b: Tensor) -> Tensor:
    acc = _acc(a, b)
    return torch.matmul(a.to(acc), b.to(acc)).pow(2).sum((1, 2, 3))


@dp_op(role="clipped_sum")
def ext_bmm_clipped_sum(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    return torch.matmul(a * coef.to(a.dtype).view(-1, 1, 1, 1), b).sum(0)


def _bmm_classify(node, st, state, name) -> Site:
    a, b = node.args[:2]
    sa, sb = st(a), st(b)
    layout = sa if isinstance(sa, BDim) and sa.dim == 2 else sb if isinstance(sb, BDim) and sb.dim == 1 else None
    if layout is None:
        raise UnsupportedGradientError(f"`{name}`: bmm `{node.name}`{node_location(node)} mixes samples")
    return Site("fused_bmm", node, {"a": a, "b": b}, {"a": (2, BDim(2, layout.inner)), "b": (1, BDim(1, layout.inner))})


def _bmm_inputs(site, env, bsz):
    return site.split("a", env, bsz), site.split("b", env, bsz)  # (B, n, M, T'), (B, n, T', N)


FUSED_BMM = SiteKind(
    "fused_bmm", _bmm_classify, targets=(aten.bmm.default,),
    per_sample=lambda site, env, bsz: torch.matmul(*_bmm_inputs(site, env, bsz)),
    fused_inputs=_bmm_inputs,
    norm=lambda site, ins, strategy, pg, env, randomized: (ext_bmm_norm(*ins), ins),
    clipped_sum=lambda site, ins, coef, strategy: ext_bmm_clipped_sum(*ins, coef).reshape(site.node.meta["val"].shape),
)


# ---- a linear strategy: per-sample products by matmul, normed and reduced (exact) ----------------------------

@dp_op(role="norm")
def ext_products_norm(a: Tensor, b: Tensor) -> Tensor:
    acc = _acc(a, b)
    return torch.bmm(a.to(acc).transpose(1, 2), b.to(acc)).pow(2).sum((1, 2))


@dp_op(role="clipped_sum")
def ext_products_clipped_sum(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    acc = _acc(a, b)
    scaled = a.to(acc) * coef.to(acc).view(-1, 1, 1)  # no einsum: its contraction path would guard on sizes
    return (scaled.reshape(-1, a.shape[-1]).t() @ b.to(acc).reshape(-1, b.shape[-1])).to(torch.promote_types(a.dtype, b.dtype))


EINSUM = Strategy(
    "ext_einsum",
    cost=lambda s, budget, dev, probes: 2 * s.B * s.T * s.M * s.N / dev.flops_32 + 10 * dev.launch,
    norm=lambda ins, pg, env, randomized: (ext_products_norm(*ins), ins),
    clipped_sum=lambda ins, coef: ext_products_clipped_sum(*ins, coef),
)


@pytest.fixture
def extended():
    register_site_kind(FUSED_BMM)
    register_strategy(EINSUM)
    try:
        yield
    finally:
        unregister_site_kind(FUSED_BMM.name)
        unregister_strategy(EINSUM.name)


@pytest.mark.parametrize("clipping,reduction,C", [("flat", "sum", 1e-3), ("per_layer", "mean", 1e6),
                                                  ("per_param", "sum", 0.5)])
def test_new_site_kind_matches_oracle(extended, clipping, reduction, C):
    case = models.per_head_einsum()
    for B in (1, 2, 5):
        assert_matches(case, case.batch(B, seed=B), max_grad_norm=C, clipping=clipping, loss_reduction=reduction)


def test_new_site_kind_is_planned_and_explained(extended):
    assert site_kind("fused_bmm").fused
    case = models.per_head_einsum()
    x, y = case.batch(4, seed=1)
    plan = explain(lambda x, y: case.loss_fn(case.model, x, y), (x, y), loss_reduction="sum")  # an MSE sum
    rows = {r["parameter"]: r for r in plan.rows}
    assert rows["w"]["strategy"] == "fused-fused_bmm" and rows["w"]["pattern"].startswith("fused_bmm(bmm."), rows
    assert "fused-fused_bmm" in str(plan)


@pytest.mark.parametrize("clipping,reduction,C", [("flat", "mean", 1e-3), ("per_layer", "sum", 1e6)])
def test_new_strategy_matches_oracle(extended, clipping, reduction, C):
    case = models.gpt_like(tied=False, n_layer=1)
    for B in (2, 5):
        assert_matches(case, case.batch(B, seed=B), max_grad_norm=C, clipping=clipping, loss_reduction=reduction,
                       strategy={"*": "ext_einsum"})


def test_new_strategy_is_an_option_and_costed(extended):
    from dpcompile.options import EXACT_LINEAR_STRATEGIES, LINEAR_STRATEGIES, DPOptions

    assert "ext_einsum" in LINEAR_STRATEGIES and "ext_einsum" in EXACT_LINEAR_STRATEGIES
    assert DPOptions.parse({"strategy": "ext_einsum"}).strategy == "ext_einsum"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    plan = explain(model, torch.randn(4, 5, 3), strategy="ext_einsum")
    for row in plan.rows:
        if row["parameter"].endswith("weight"):
            assert row["strategy"] == "ext_einsum" and row["forced"] and "ext_einsum" in row["cost_us_per_sample"]


def test_unregistered_strategy_is_refused():
    from dpcompile.options import DPOptions

    with pytest.raises(OptionsError, match="ext_einsum"):
        DPOptions.parse({"strategy": "ext_einsum"})


def test_inexact_strategy_must_declare_accounting_and_is_never_auto():
    with pytest.raises(ValueError, match="accounting"):
        Strategy("ext_guess", exact=False, norm=EINSUM.norm, clipped_sum=EINSUM.clipped_sum)
    with pytest.raises(ValueError, match="norm and clipped_sum"):
        Strategy("ext_nothing")
    guess = Strategy("ext_guess", exact=False, accounting="randomized", cost=lambda *a: 0,
                     norm=EINSUM.norm, clipped_sum=EINSUM.clipped_sum)
    register_strategy(guess)
    try:
        from dpcompile.passes.plan import LinearShape, plan_group
        from dpcompile.options import DPOptions
        import sympy

        class PG:  # what plan_group reads of a parameter
            name = "l.weight"
            contributions = []
            fused = True

        pg = PG()
        B = sympy.Symbol("B", positive=True, integer=True)
        choice = plan_group([pg], {pg: LinearShape(B, 64, 32, 32, 4)}, DPOptions.parse({}), B, 8)[pg]
        assert choice.strategy != "ext_guess" and "ext_guess" not in choice.costs  # free, yet never chosen
        assert get_strategy("ext_guess").accounting == "randomized"
    finally:
        unregister_strategy("ext_guess")
