"""Site kind `conv` (dpcompile/passes/sites/conv.py): the weight and bias outputs of convolution_backward,
materialized with the batch folded into the groups (padding, groups and stride in the models)."""
from __future__ import annotations

import pytest

import models
from dp_check import SITE_SWEEP, assert_matches_batches, site_kinds

CASE = models.conv_net(dim=1)
CONV2D = models.conv_net(dim=2, groups=1)


@pytest.mark.parametrize("case", [CASE, CONV2D], ids=lambda c: c.name)
def test_conv_parameters_land_on_conv(case):
    kinds = site_kinds(case, 4)
    assert kinds and all(k == ("conv",) for k in kinds.values()), kinds


@pytest.mark.parametrize("clipping,C,reduction", SITE_SWEEP)
def test_conv_matches_oracle(clipping, C, reduction):
    assert_matches_batches(CASE, max_grad_norm=C, clipping=clipping, loss_reduction=reduction)


def test_conv2d_matches_oracle():
    clipping, C, reduction = SITE_SWEEP[2]
    assert_matches_batches(CONV2D, max_grad_norm=C, clipping=clipping, loss_reduction=reduction)
