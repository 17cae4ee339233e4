"""passes/trace_cache.py: a clipping group's trace reused for an identical group (compile time), never for a group
whose function would trace differently. The test suite runs with DPCOMPILE_VERIFY_TRACE_CACHE=1 (conftest.py), so
every reuse anywhere in it is checked against a fresh trace; here: reuse happens, the gradients stay exact, and the
check does fail when the canonical form is made to miss something."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

import dpcompile
import dpcompile.passes.trace_cache as trace_cache
from dpcompile.testing import oracle
from no_interpreter import last_json, run_script


class _Blocks(nn.Module):
    """Identical blocks (reused traces), and a layer of the same shapes whose weight is used times 2 (its gradient's
    chain holds a mul the form must see)."""

    def __init__(self, n=3, d=6):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.LayerNorm(d)) for _ in range(n))
        self.scaled = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = torch.tanh(nn.functional.linear(x, self.scaled.weight * 2.0, self.scaled.bias))
        return self.head(x).pow(2).sum()


def _compile_and_count(model, x, caplog, **options):
    """(groups traced, groups reused, .grad of every parameter) of one compiled call and backward."""
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpcompile"):
        dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", **options)(x).backward()
    line = next(r.getMessage() for r in caplog.records if "clipping traces made" in r.getMessage())
    made, reused = re.match(r"flashdp: (\d+) clipping traces made, (\d+) reused", line).groups()
    return int(made), int(reused), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_identical_blocks_reuse_one_trace_and_stay_exact(caplog, clipping):
    torch.manual_seed(0)
    model = _Blocks()
    x = torch.randn(4, 5, 6)
    traced, reused, grads = _compile_and_count(model, x, caplog, max_grad_norm=0.3, clipping=clipping)
    if clipping == "per_layer":  # 3 blocks x (linear, norm) + scaled + head: a block's two traced, reused twice
        assert (traced, reused) == (4, 4)
    else:  # one group of 16 parameters, in pieces: 16 norms, the factors, 16 clipped sums; 13 distinct (a block's
        # four parameters' norms and sums reused twice, the scaled layer's bias reusing a block bias's)
        assert (traced, reused) == (13, 20)
    want = oracle.reference_clipped_grads(model, lambda m, xb: m(xb), [x], max_grad_norm=0.3, clipping=clipping)
    for name, w in want.items():
        torch.testing.assert_close(grads[name].double(), w, rtol=1e-5, atol=1e-6, msg=name)


def test_a_form_that_misses_the_chain_is_caught_by_the_check(caplog, monkeypatch):
    """Leave each contribution's chain (and the gradient node it ends at) out of the form: the scaled layer (a block linear's shapes, a mul by 2 in
    its weight gradient's chain) then hits a block's trace, and the verify mode refuses the copy."""
    dropped = {("Contribution", "chain"), ("ParamGrad", "grad")}
    monkeypatch.setattr(trace_cache, "IGNORED_FIELDS", trace_cache.IGNORED_FIELDS | dropped)
    monkeypatch.setenv("DPCOMPILE_VERIFY_TRACE_CACHE", "1")
    torch.manual_seed(0)
    with pytest.raises(Exception, match="reused trace differs"):
        _compile_and_count(_Blocks(), torch.randn(4, 5, 6), caplog, max_grad_norm=0.3, clipping="per_layer")


def _launch_graph(constants: dict) -> torch.fx.GraphModule:
    """x -> one functional user Triton launch whose constant arguments sit in torch's side table."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    launch = graph.call_function(triton_kernel_wrapper_functional, (),
                                 {"kernel_idx": 0, "constant_args_idx": kernel_side_table.add_constant_args(constants),
                                  "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x": x},
                                  "tensors_to_clone": ["x"]})
    graph.output(launch)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_launches_compare_by_their_constants_not_their_side_table_index():
    """Every trace registers its launch's constants under a new side-table index: two traces of one function
    differ only there, and compare equal; a launch with other constants compares different (verify mode)."""
    first, second = _launch_graph({"BLOCK": 64, "IEEE": True}), _launch_graph({"IEEE": True, "BLOCK": 64})
    other = _launch_graph({"BLOCK": 128, "IEEE": True})
    assert trace_cache.graph_form(first) == trace_cache.graph_form(second)
    assert trace_cache.graph_form(first) != trace_cache.graph_form(other)
    cache = trace_cache.GroupTraceCache()
    cache.put(("key",), first)
    assert cache.get(("key",)) is first


_SHARED_LAUNCHES = """
import json, logging, os
import torch
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
from torch.fx.experimental.proxy_tensor import make_fx
from dpcompile.codegen import ops
from dpcompile.passes.rewrite import inline_triton_ops

messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("dpcompile").addHandler(handler)
logging.getLogger("dpcompile").setLevel(logging.INFO)

def two_calls(a1, b1, a2, b2):
    return torch.ops.dpcompile.linear_norm(a1, b1) + torch.ops.dpcompile.linear_norm(a2, b2)

gm = make_fx(two_calls, tracing_mode="fake")(*[torch.randn(4, 5, 6), torch.randn(4, 5, 3)] * 2)
ops._use_triton = lambda *t: True  # the CUDA code path: the op bodies launch Triton kernels
inline_triton_ops(gm.graph, {})
vals = [n.meta["val"] for n in gm.graph.nodes if n.target is triton_kernel_wrapper_functional]
print(json.dumps({"messages": messages, "launches": len(vals),
                  "shared": [vals[0][k] is vals[1][k] for k in vals[0]],
                  "same_meta": [(vals[0][k].shape, vals[0][k].stride(), vals[0][k].dtype)
                                == (vals[1][k].shape, vals[1][k].stride(), vals[1][k].dtype) for k in vals[0]]}))
"""


def test_identical_op_calls_share_one_trace_of_their_triton_launches():
    """The inline stage (Inductor on CUDA) traces an op body that launches a Triton kernel once for identical calls
    (the blocks of a model); the copies get fresh values of the launch's outputs, never the first call's. On fake
    CPU tensors with the CUDA code path forced, in a process without the interpreter (which would run the kernel on
    them), in verify mode: the reuse is traced anew and compared."""
    got = last_json(run_script(_SHARED_LAUNCHES, verify_trace_cache=True))
    assert any("1 op bodies traced for inlining, 1 reused" in m for m in got["messages"]), got["messages"]
    assert got["launches"] == 2 and got["shared"] and not any(got["shared"]) and all(got["same_meta"])
