"""Site kind `whole` (dpcompile/passes/sites/whole.py): in a graph compiled for a batch of one
(passes/one_sample.py) the gradient itself is sample 0's, whatever op produced it; materialized. The other kinds'
files run B = 1 too; here every kind's model is taken through the batch-of-one graph, and between batched graphs
of the same compiled model."""
from __future__ import annotations

import pytest

import models
from dp_check import SITE_SWEEP, assert_site_combo, site_kinds

CASES = [models.elementwise_params(), models.per_head_einsum(), models.conv_net(dim=1),
         models.gpt_like(n_layer=1, tied=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_parameter_lands_on_whole_at_batch_size_one(case):
    kinds = site_kinds(case, 1)
    assert kinds and all(k == ("whole",) for k in kinds.values()), kinds


@pytest.mark.parametrize("combo", SITE_SWEEP, ids=lambda k: "-".join(map(str, k)))
def test_whole_matches_oracle(combo):
    # one compiled model: the batch-of-one graph before, between and after the batched and empty ones
    assert_site_combo(CASES[0], combo, sizes=(1, 2, 1, 0, 5, 1))


@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: c.name)
def test_whole_matches_oracle_on_every_kind(case):
    assert_site_combo(case, SITE_SWEEP[2], sizes=(1,))
