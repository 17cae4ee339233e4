"""The batch-dim rule registry (passes/batchdim_states.py, rules in passes/batchdim_rules/): what it holds and how it
refuses a second rule for an op. What each rule computes is tested through graphs (test_batchdim_ops.py)."""
from __future__ import annotations

import pytest
import torch

from dpcompile.passes import batchdim, batchdim_states
from dpcompile.passes.batchdim_states import _HANDLERS, _PACKET_HANDLERS, batchdim_rule, rule_for

aten = torch.ops.aten
FAMILIES = ("conv", "embedding", "indexing", "matmul", "pointwise", "reductions", "views")


def test_every_op_maps_to_a_rule_of_an_op_family():
    assert len(_HANDLERS) > 100 and len(_PACKET_HANDLERS) > 20
    modules = {fn.__module__ for fn in list(_HANDLERS.values()) + [fn for fn, _ in _PACKET_HANDLERS.values()]}
    assert modules == {f"dpcompile.passes.batchdim_rules.{name}" for name in FAMILIES}
    assert all(callable(fn) for fn in _HANDLERS.values())
    assert all(isinstance(op, torch._ops.OpOverload) for op in _HANDLERS)
    # the engine and the importers of batchdim.py see the same registry
    assert batchdim._HANDLERS is _HANDLERS and batchdim.rule_for is rule_for


def test_lookup_by_op_then_by_packet_name():
    assert rule_for(aten.mm.default).__name__ == "mm"
    assert rule_for(aten.view.default).__name__ == "view_op"
    assert rule_for(aten.sum.dim_IntList).__name__ == "reduction"
    # attention kernels by packet name, any overload; pooling only its default overload
    assert rule_for(aten._scaled_dot_product_efficient_attention.default).__name__ == "sdpa"
    assert rule_for(aten.avg_pool2d.default).__name__ == "pool"
    assert rule_for(aten.avg_pool2d.out) is None
    assert rule_for(aten.add.Tensor) is None  # pointwise: the engine's broadcasting fallback, no rule
    assert rule_for(aten.mm.out) is None  # by overload: mm.default's rule is not mm.out's


def test_a_second_rule_for_an_op_is_an_error_and_registers_nothing():
    before, packets = dict(_HANDLERS), dict(_PACKET_HANDLERS)
    fresh = aten.mm.out  # an out= overload: no rule
    assert fresh not in _HANDLERS

    def rule(analysis, node):
        return None

    with pytest.raises(ValueError, match=r"already registered for mm\.default"):
        batchdim_rule(fresh, aten.mm.default)(rule)
    with pytest.raises(ValueError, match="already registered for avg_pool2d"):
        batchdim_rule(packets=("avg_pool2d",))(rule)
    with pytest.raises(ValueError, match="listed twice"):
        batchdim_rule(fresh, fresh)(rule)
    assert _HANDLERS == before and _PACKET_HANDLERS == packets  # no op of a refused call is registered
    assert batchdim_states.rule_for(fresh) is None
