"""Site kind `conv` (dpcompile/passes/sites/conv.py): the weight and bias outputs of convolution_backward,
materialized with the batch folded into the groups (padding, groups and stride in the models)."""
from __future__ import annotations

import pytest

import models
from dp_check import assert_site_combo, site_kinds, site_sweep

CASE = models.conv_net(dim=1)
CONV2D = models.conv_net(dim=2, groups=1)


@pytest.mark.parametrize("case", [CASE, CONV2D], ids=lambda c: c.name)
def test_conv_parameters_land_on_conv(case):
    kinds = site_kinds(case, 4)
    assert kinds and all(k == ("conv",) for k in kinds.values()), kinds


@site_sweep(CASE, CONV2D)
def test_conv_matches_oracle(case, combo):
    assert_site_combo(case, combo)
