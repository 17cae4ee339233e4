"""Site kind `bmm` (dpcompile/passes/sites/bmm.py): bmm(A, B) with samples along the contracted dim (per-head
weights through einsum), materialized as a per-sample einsum."""
from __future__ import annotations

import pytest

import models
from dp_check import SITE_SWEEP, assert_matches_batches, site_kinds

CASE = models.per_head_einsum()


def test_per_head_weight_lands_on_bmm():
    kinds = site_kinds(CASE, 4)
    assert kinds["w"] == ("bmm",) and kinds["scale"] == ("rows",), kinds


@pytest.mark.parametrize("clipping,C,reduction", SITE_SWEEP)
def test_bmm_matches_oracle(clipping, C, reduction):
    assert_matches_batches(CASE, max_grad_norm=C, clipping=clipping, loss_reduction=reduction)
