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
    assert rows["blocks.0.attn.qkv.weight"]["strategy"] == "fused-linear"
    assert rows["blocks.0.attn.qkv.bias"]["group"] == rows["blocks.0.attn.qkv.weight"]["group"] == "blocks.0.attn.qkv"
    assert rows["blocks.0.ln1.weight"]["strategy"] == "fused-rows"
    # the tied token embedding / lm_head: two uses summed per sample before the norm
    assert "linear" in rows["wte.weight"]["pattern"] and "embedding" in rows["wte.weight"]["pattern"]
    assert rows["wte.weight"]["strategy"] == "materialize"
    # position embedding: ids shared by every sample, no per-sample table materialized
    assert rows["wpe.weight"]["strategy"] == "fused-embedding"
    text = str(plan)
    assert "wte.weight" in text and "fused-linear" in text and "clipping='per_layer'" in text


def test_explain_skips_frozen_parameters():
    case = models.frozen_layers()
    plan = dpcompile.explain(case.model, case.batch(3)[:1], clipping="flat")
    frozen = {n for n, p in case.model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & {r["parameter"] for r in plan.rows}
    assert {r["group"] for r in plan.rows} == {"flat"}
