"""Site kind `bmm` (dpcompile/passes/sites/bmm.py): bmm(A, B) with samples along the contracted dim (per-head
weights through einsum), materialized as a per-sample einsum."""
from __future__ import annotations

import models
from dp_check import assert_site_combo, site_kinds, site_sweep

CASE = models.per_head_einsum()


def test_per_head_weight_lands_on_bmm():
    kinds = site_kinds(CASE, 4)
    assert kinds["w"] == ("bmm",) and kinds["scale"] == ("rows",), kinds


@site_sweep(CASE)
def test_bmm_matches_oracle(case, combo):
    assert_site_combo(case, combo)
