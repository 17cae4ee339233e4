"""dpcompile.explain: one row per trainable parameter with its group, threshold, site pattern and strategy."""
from __future__ import annotations

import math

import dpcompile
import models


def test_explain_lists_every_trainable_parameter():
    case = models.gpt_like(tied=True)
    plan = dpcompile.explain(case.model, case.batch(2)[:1], max_grad_norm=2.0, clipping="per_layer")
    names = [r["parameter"] for r in plan.rows]
    assert names and sorted(names) == sorted(n for n, p in case.model.named_parameters() if p.requires_grad)
    rows = {r["parameter"]: r for r in plan.rows}
    n_groups = len({r["group"] for r in plan.rows})
    assert all(math.isclose(r["threshold"], 2.0 / math.sqrt(n_groups)) for r in plan.rows)
    qkv = rows["blocks.0.attn.qkv.weight"]
    assert qkv["strategy"] in ("direct", "ghost", "single_pass", "stored", "two_pass") and not qkv["forced"]
    # the planner's choice is the cheapest of the predicted costs it shows
    assert set(qkv["cost_us_per_sample"]) == {"direct", "ghost", "single_pass", "stored", "two_pass"}
    assert qkv["cost_us_per_sample"][qkv["strategy"]] == min(qkv["cost_us_per_sample"].values())
    assert rows["blocks.0.attn.qkv.bias"]["group"] == rows["blocks.0.attn.qkv.weight"]["group"] == "blocks.0.attn.qkv"
    assert rows["blocks.0.ln1.weight"]["strategy"] == "fused-rows"
    # the tied token embedding / lm_head: two uses summed per sample before the norm
    assert "linear" in rows["wte.weight"]["pattern"] and "embedding" in rows["wte.weight"]["pattern"]
    assert rows["wte.weight"]["strategy"] == "materialize"
    # position embedding: ids shared by every sample, no per-sample table materialized
    assert rows["wpe.weight"]["strategy"] == "fused-embedding"
    text = str(plan)
    assert "wte.weight" in text and f"{qkv['strategy']}=" in text and "clipping='per_layer'" in text


def test_explain_skips_frozen_parameters():
    case = models.frozen_layers()
    plan = dpcompile.explain(case.model, case.batch(3)[:1], clipping="flat")
    frozen = {n for n, p in case.model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & {r["parameter"] for r in plan.rows}
    assert {r["group"] for r in plan.rows} == {"flat"}


def test_explain_shows_forced_strategies():
    case = models.gpt_like(tied=False)
    plan = dpcompile.explain(case.model, case.batch(2)[:1], clipping="per_layer",
                             strategy={"lm_head.*": "single_pass", "*.weight": "ghost"})
    rows = {r["parameter"]: r for r in plan.rows}
    assert rows["lm_head.weight"]["strategy"] == "single_pass" and rows["lm_head.weight"]["forced"]
    assert rows["blocks.0.attn.qkv.weight"]["strategy"] == "ghost"
    assert rows["blocks.0.attn.qkv.bias"]["strategy"] == "fused-rows"
    assert "single_pass (forced)" in str(plan)


def test_planner_follows_the_cost_model_on_real_shapes():
    """GPT-2-small widths: direct at T=1024 beats ghost (T(M+N) > MN), ghost wins at T=16; per-layer groups with
    one linear site take single_pass when its saving is positive; a flat group gets at most one single_pass site."""
    import sympy

    from dpcompile.options import DPOptions
    from dpcompile.passes.plan import LinearShape, linear_costs, plan_group

    B = sympy.Symbol("s0", positive=True, integer=True)
    costs = linear_costs(LinearShape(B, 1024, 768, 768, 2), 256 * 2**20)
    at = {k: float(v.subs(B, 8)) for k, v in costs.items()}
    assert at["single_pass"] < at["direct"] < at["ghost"]
    short = {k: float(v.subs(B, 8)) for k, v in linear_costs(LinearShape(B, 16, 768, 768, 2), 256 * 2**20).items()}
    assert short["ghost"] < short["direct"]

    class PG:
        def __init__(self, name):
            self.name, self.fused = name, True

    pgs = [PG("a.weight"), PG("b.weight"), PG("c.weight")]
    shapes = {pg: LinearShape(B, 1024, 768, 768 * (i + 1), 2) for i, pg in enumerate(pgs)}
    choice = plan_group(pgs, shapes, DPOptions.parse({"clipping": "flat"}), B, 8)
    # single_pass saves most on the widest; the others keep their products (768 N <= 1024 (768 + N)) until the group's
    # factor is known, formed once at vendor-GEMM speed
    assert [choice[pg].strategy for pg in pgs] == ["stored", "stored", "single_pass"]
    # short rows: products larger than the operands (768 N > 128 (768 + N)) are not kept: formed twice instead
    short = {pg: LinearShape(B, 128, 768, 768 * (i + 1), 2) for i, pg in enumerate(pgs)}
    choice = plan_group(pgs, short, DPOptions.parse({"clipping": "flat"}), B, 8)
    assert "stored" not in [choice[pg].strategy for pg in pgs]
    # per-layer groups of one linear site are unchanged: single_pass
    for pg in pgs:
        assert plan_group([pg], shapes, DPOptions.parse({}), B, 8)[pg].strategy == "single_pass"
    # a 10 MB budget holds a's 8 x 768 x 768 bf16 products (9.4 MB) only: stored and two_pass are out for b and c, which take
    # a strategy without per-sample writes; single_pass moves to a (c's would need a Python loop over 3 chunks)
    choice = plan_group(pgs, shapes, DPOptions.parse({"clipping": "flat", "single_pass_budget_mb": 10}), B, 8)
    assert choice[pgs[0]].strategy == "single_pass" and not choice[pgs[0]].chunked
    assert [choice[pg].strategy in ("direct", "ghost") for pg in pgs[1:]] == [True, True]


def test_explain_shows_randomized_sites_and_auto_never_picks_them():
    import sympy

    from dpcompile.options import DPOptions
    from dpcompile.passes.plan import LinearShape, linear_costs, plan_group

    case = models.gpt_like(n_layer=1, tied=False)
    plan = dpcompile.explain(case.model, case.batch(2)[:1], clipping="per_layer", probes=16,
                             strategy={"blocks.*": "randomized"})
    rows = {r["parameter"]: r for r in plan.rows}
    qkv, head = rows["blocks.0.attn.qkv.weight"], rows["lm_head.weight"]
    assert qkv["strategy"] == "randomized" and qkv["forced"] and "randomized" in qkv["cost_us_per_sample"]
    assert rows["blocks.0.attn.qkv.bias"]["strategy"] == "fused-rows"  # only linear weights are randomized
    assert head["strategy"] in ("direct", "ghost", "single_pass", "stored", "two_pass")
    assert "randomized" not in head["cost_us_per_sample"]
    text = str(plan)
    assert "randomized (forced)" in text and "randomized=" in text and "probes=16" in text
    assert "randomized" not in str(dpcompile.explain(case.model, case.batch(2)[:1], clipping="per_layer"))
    # long sequences in fp32: the randomized cost is below direct and ghost, and still "auto" never takes it
    B = sympy.Symbol("s0", positive=True, integer=True)
    costs = {k: float(v.subs(B, 8)) for k, v in linear_costs(LinearShape(B, 4096, 768, 768, 4), 256 * 2**20).items()}
    assert costs["randomized"] < min(costs["direct"], costs["ghost"])
    more = float(linear_costs(LinearShape(B, 4096, 768, 768, 4), 256 * 2**20, probes=64)["randomized"].subs(B, 8))
    assert more > costs["randomized"]  # O(B T k (M + N)): the probe count is in the cost

    class PG:
        def __init__(self, name):
            self.name, self.fused = name, True

    pgs = [PG("a.weight"), PG("b.weight"), PG("c.weight")]
    shapes = {pg: LinearShape(B, 4096, 768, 768, 4) for pg in pgs}
    for strategy in ("auto", {"a.*": "direct"}, {"a.*": "randomized"}):
        choice = plan_group(pgs, shapes, DPOptions.parse({"clipping": "flat", "strategy": strategy}), B, 8)
        picked = [choice[pg].strategy for pg in pgs]
        assert picked.count("randomized") == (1 if strategy == {"a.*": "randomized"} else 0), (strategy, picked)
        assert "single_pass" in picked  # a forced randomized site is never the group's single-pass one


def test_randomized_sites_probe_stored_products_where_stored_may_keep_them():
    """A forced randomized site takes its estimate from stored products (the same law and probes, M N k products
    per sample instead of T k (M + N)) where stored's conditions hold (the products fit the budget and are no
    larger than the operands, M N <= T (M + N)) and that costs less; else from the rows, with two_pass's clipped
    sum within the budget and our clipped-sum GEMM over it. Auto sites never see either randomized cost."""
    import sympy

    from dpcompile.options import DPOptions
    from dpcompile.passes.plan import LinearShape, plan_group

    class PG:
        def __init__(self, name):
            self.name, self.fused = name, True

    B = sympy.Symbol("s0", positive=True, integer=True)
    for T, budget_mb, op in ((4096, 256, "randomized_stored"), (64, 256, "randomized_vendor_sum"),
                             (4096, 1, "randomized")):  # 8 x 768 x 768 bf16 products: 9 MiB
        pgs = [PG("a.weight"), PG("b.weight")]
        shapes = {pg: LinearShape(B, T, 768, 768, 2) for pg in pgs}
        opts = DPOptions.parse({"clipping": "per_layer", "strategy": {"a.*": "randomized"},
                                "single_pass_budget_mb": budget_mb})
        choice = plan_group(pgs[:1], shapes, opts, B, 8)[pgs[0]]
        assert choice.strategy == "randomized" and choice.op_strategy == op, (T, budget_mb, choice.op_strategy)
        auto = plan_group(pgs[1:], shapes, opts, B, 8)[pgs[1]]
        assert not {"randomized", "randomized_stored"} & set(auto.costs)


def test_planner_finds_each_distinct_linear_shape_once(monkeypatch):
    """Identical blocks give their linear sites the same operand shapes: the plan stage traces a shape once
    (plan.linear_shape's memo, per graph), and every site still gets what a trace of its own operands gives."""
    from dpcompile.passes import driver
    from dpcompile.passes.plan import linear_shape

    calls = []

    def checked(pg, batch_node, batch_dim, memo=None):
        got = linear_shape(pg, batch_node, batch_dim, memo)
        assert got == linear_shape(pg, batch_node, batch_dim)  # no memo: traced afresh
        calls.append(len(memo))  # distinct shapes traced so far
        return got

    monkeypatch.setattr(driver, "linear_shape", checked)
    case = models.gpt_like(n_layer=3, tied=False)
    for clipping in ("flat", "per_layer"):
        calls.clear()
        dpcompile.explain(case.model, case.batch(2)[:1], clipping=clipping)
        # 4 linear weights a block (qkv, proj, fc, fc2) and the head: 13 sites, 5 shapes traced
        assert len(calls) == 3 * 4 + 1 and calls[-1] == 4 + 1, (clipping, calls)
