"""What the rewritten joint graph contains: per-site norm and clipped-sum ops, and no trace of the original
non-private weight-gradient computations."""
from __future__ import annotations

import torch
from torch import nn

import dpcompile
import dpcompile.backend as backend

aten = torch.ops.aten
dp = torch.ops.dpcompile


def _rewritten_graph(model, x, monkeypatch, **options):
    graphs = []

    def capture(graph, ctx):
        run(graph, ctx)
        graphs.append(graph)

    run = backend.run_dp_pass
    monkeypatch.setattr(backend, "run_dp_pass", capture)
    torch._dynamo.reset()
    dpcompile.compile(model, backend="flashdp_eager", **options)(x).pow(2).sum().backward()
    (graph,) = graphs
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_weight_gradient_mms_are_replaced(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    ops = _rewritten_graph(model, torch.randn(5, 6, 4), monkeypatch, clipping="per_layer", loss_reduction="sum",
                           strategy="direct")
    # forward: 2 addmm; backward: only the input gradient of layer 2 is an mm (layer 1's input needs no grad)
    assert ops.count(aten.addmm.default) == 2 and ops.count(aten.mm.default) == 1
    assert ops.count(dp.linear_norm.default) == 2 and ops.count(dp.linear_clipped_sum.default) == 2
    assert ops.count(dp.rows_norm.default) == 2 and ops.count(dp.rows_clipped_sum.default) == 2
    # bias gradients: no sum over the batch left besides the clipped sums (the loss' own sum is a full reduce)
    assert aten.sum.dim_IntList not in ops


def test_frozen_layer_costs_nothing(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    ops = _rewritten_graph(model, torch.randn(5, 4), monkeypatch, clipping="flat", loss_reduction="sum",
                           strategy="direct")
    assert ops.count(dp.linear_norm.default) == 1 and ops.count(dp.rows_norm.default) == 1


def test_strategies_use_their_ops(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6, 4)
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="ghost")
    assert ops.count(dp.linear_ghost_norm.default) == 2 and ops.count(dp.linear_clipped_sum.default) == 2
    assert dp.linear_norm.default not in ops
    monkeypatch.undo()
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="single_pass")
    assert ops.count(dp.linear_single_pass.default) == 2
    assert dp.linear_norm.default not in ops and dp.linear_clipped_sum.default not in ops
    monkeypatch.undo()
    # flat: one group, so single_pass can serve one of its two linear sites only
    ops = _rewritten_graph(model, x, monkeypatch, clipping="flat", strategy={"0.weight": "single_pass"})
    assert ops.count(dp.linear_single_pass.default) == 1 and ops.count(dp.linear_clipped_sum.default) == 1
    monkeypatch.undo()
    # a budget below one sample's product: the chunked form
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="single_pass",
                           single_pass_budget_mb=1e-6)
    assert ops.count(dp.linear_single_pass_chunked.default) == 2 and dp.linear_single_pass.default not in ops


def test_no_kept_whole_op_survives_for_inductor(monkeypatch):
    """B == 1 keeps each gradient as it is (it is sample 0's): the embedding backward the DP table keeps whole must
    still be decomposed, or Inductor refuses to lower it."""
    import models

    case = models.gpt_like(tied=True)
    for B in (1, 3):
        ops = _rewritten_graph(case.model, case.batch(B)[0], monkeypatch, clipping="flat")
        assert aten.embedding_dense_backward.default not in ops, B
        monkeypatch.undo()
