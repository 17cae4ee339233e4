"""Site kind `rows` (dpcompile/passes/sites/rows.py): a sum over dims that include the batch dim (biases,
LayerNorm / RMSNorm affine, elementwise scales and scalar offsets), fused over the per-sample row sums."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from dp_check import assert_site_combo, site_kinds, site_sweep

CASE = models.elementwise_params()  # scale (d,), scalar bias (), lin.bias


class _Normed(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)

    def forward(self, x):
        return self.rms(torch.tanh(self.ln(self.lin(x))))


NORMED = models.Case("normed", models._build(0, _Normed), models._regression_batch((2, 3), (2, 3)),
                     lambda m, x, y: models.mse_sum(m(x), y))


@pytest.mark.parametrize("case,rows", [(CASE, ["scale", "bias", "lin.bias"]),
                                       (NORMED, ["lin.bias", "ln.weight", "ln.bias", "rms.weight"])],
                         ids=["elementwise", "norms"])
def test_biases_norms_and_scales_land_on_rows(case, rows):
    kinds = site_kinds(case, 4)
    assert all(kinds[n] == ("rows",) for n in rows), kinds


@site_sweep(CASE, NORMED)
def test_rows_matches_oracle(case, combo):
    assert_site_combo(case, combo)
