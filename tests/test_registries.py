"""The registries the pass is built on: op roles, strategies, site kinds. What they derive, and that the pass reads
them instead of keeping its own lists (issue 20)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dpcompile
from dpcompile import strategy_registry as SR
from dpcompile.codegen.registry import inlined_ops, ops_with_role, role_of
from dpcompile.passes import sites

PASSES = Path(dpcompile.__file__).resolve().parent / "passes"
BUILTIN_KINDS = ("bmm", "conv", "embedding", "linear", "rows", "whole")


def test_no_kind_strings_outside_the_site_registry():
    """Only passes/sites/ names site kinds; the rest of the pass looks them up."""
    pattern = re.compile(r"\"(%s)\"|\.kind ==|\.kind !=|\.kind in " % "|".join(BUILTIN_KINDS))
    offenders = [f"{f.name}:{i}: {line.strip()}" for f in sorted(PASSES.glob("*.py"))
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_site_kinds_are_registered_and_derived():
    assert {k.name for k in sites.kinds()} >= set(BUILTIN_KINDS)
    assert set(sites.fused_kinds()) >= {"linear", "rows", "embedding"}
    assert not {"bmm", "conv", "whole"} & set(sites.fused_kinds())
    assert sites.site_kind("linear").strategies and not sites.site_kind("rows").strategies
    assert sites.site_kind("whole").keeps_node
    with pytest.raises(KeyError, match="unknown site kind"):
        sites.site_kind("nope")
    with pytest.raises(ValueError, match="needs norm and clipped_sum"):
        sites.SiteKind("half", classify=None, per_sample=None, fused_inputs=lambda *a: ())


@pytest.mark.parametrize("op,kind", [(torch.ops.aten.mm.default, "linear"), (torch.ops.aten.sum.dim_IntList, "rows"),
                                     (torch.ops.aten.embedding_dense_backward.default, "embedding"),
                                     (torch.ops.aten.bmm.default, "bmm")])
def test_each_kind_matches_its_ops(op, kind):
    graph = torch.fx.Graph()
    node = graph.call_function(op, ())
    assert sites.match(node).name == kind


def test_strategy_names_come_from_the_registry():
    from dpcompile.options import EXACT_LINEAR_STRATEGIES, LINEAR_STRATEGIES

    assert LINEAR_STRATEGIES == ("auto", "direct", "ghost", "single_pass", "stored", "two_pass", "randomized")
    assert EXACT_LINEAR_STRATEGIES == ("direct", "ghost", "single_pass", "stored", "two_pass")
    for name in SR.inexact_names():
        assert SR.get_strategy(name).accounting in SR.ACCOUNTINGS
    # the internal forms the rewrite runs are records too, but not options
    for name in ("single_pass_chunked", "randomized_vendor_sum", "randomized_stored"):
        assert not SR.get_strategy(name).option
    assert SR.get_strategy("single_pass").op_strategy(chunked=True, stored_products=False) == "single_pass_chunked"
    assert SR.get_strategy("randomized").op_strategy(chunked=False, stored_products=False) == "randomized_vendor_sum"
    assert SR.get_strategy("randomized").op_strategy(chunked=False, stored_products=True) == "randomized_stored"
    assert SR.get_strategy("randomized").op_strategy(chunked=True, stored_products=False) == "randomized"
    assert SR.get_strategy("direct").op_strategy(chunked=True, stored_products=False) == "direct"
    with pytest.raises(ValueError, match="already registered"):
        SR.register_strategy(SR.get_strategy("direct"))


def test_op_roles():
    d = torch.ops.dpcompile
    assert d.linear_clipped_sum.default in ops_with_role("clipped_sum")
    assert d.linear_single_pass_chunked.default in ops_with_role("clipped_sum")
    assert d.linear_single_pass_chunked.default not in inlined_ops()  # a custom_op: not inlined
    assert d.rows_norm.default in ops_with_role("norm") and d.rows_norm.default in inlined_ops()
    assert role_of("rows_colsum") == "prepare" and role_of("nope") is None
    with pytest.raises(ValueError, match="role"):
        ops_with_role("sum")
