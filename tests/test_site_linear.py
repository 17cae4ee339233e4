"""Site kind `linear` (dpcompile/passes/sites/linear.py): mm(A, B) with samples along the contracted dim, fused; its
norm and clipped-sum ops are the planned strategy's (every strategy against the oracle: tests/test_models.py)."""
from __future__ import annotations

import pytest

import models
from dp_check import assert_site_combo, site_kinds, site_sweep

# (B, T, d) inputs: the mm contracts (batch, time); (B, d) inputs: one row per sample
CASE = models.mlp(input_ndim=3, bias=False, depth=3)
ONE_ROW = models.mlp(depth=2)


@pytest.mark.parametrize("case", [CASE, ONE_ROW], ids=lambda c: c.name)
def test_weights_land_on_linear(case):
    kinds = site_kinds(case, 4)
    weights = [n for n in kinds if n.endswith("weight")]
    assert weights and all(kinds[n] == ("linear",) for n in weights), kinds


@site_sweep(CASE, ONE_ROW)
def test_linear_matches_oracle(case, combo):
    assert_site_combo(case, combo)
