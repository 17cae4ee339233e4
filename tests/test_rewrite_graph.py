"""What the rewritten joint graph contains: per-site norm and clipped-sum ops, and no trace of the original
non-private weight-gradient computations."""
from __future__ import annotations

import operator

import torch
from torch import nn

import dpcompile
import dpcompile.backend as backend

aten = torch.ops.aten
dp = torch.ops.dpcompile


def _rewritten_graph(model, x, monkeypatch, inline=False, nodes=False, **options):
    graphs = []

    def capture(graph, ctx):
        ctx.inline_ops = inline  # what the Inductor backend sets: the triton_op bodies inlined after the checks
        run(graph, ctx)
        graphs.append(graph)

    run = backend.run_dp_pass
    monkeypatch.setattr(backend, "run_dp_pass", capture)
    torch._dynamo.reset()
    dpcompile.compile(model, backend="flashdp_eager", **options)(x).pow(2).sum().backward()
    (graph,) = graphs
    return [n if nodes else n.target for n in graph.nodes if n.op == "call_function"]


def test_weight_gradient_mms_are_replaced(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    ops = _rewritten_graph(model, torch.randn(5, 6, 4), monkeypatch, clipping="per_layer", loss_reduction="sum",
                           strategy="direct")
    # forward: 2 addmm; backward: only the input gradient of layer 2 is an mm (layer 1's input needs no grad)
    assert ops.count(aten.addmm.default) == 2 and ops.count(aten.mm.default) == 1
    assert ops.count(dp.linear_norm.default) == 2 and ops.count(dp.linear_clipped_sum.default) == 2
    # each layer's bias: its column sums, then one op with the layer's factor (the weight's norm as `rest`)
    assert ops.count(dp.rows_colsum.default) == 2 and ops.count(dp.rows_group_clipped_sum.default) == 2
    assert dp.rows_norm.default not in ops and dp.rows_clipped_sum.default not in ops
    # bias gradients: no sum over the batch left besides the clipped sums (the loss' own sum is a full reduce)
    assert aten.sum.dim_IntList not in ops


def test_frozen_layer_costs_nothing(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    ops = _rewritten_graph(model, torch.randn(5, 4), monkeypatch, clipping="flat", loss_reduction="sum",
                           strategy="direct")
    assert ops.count(dp.linear_norm.default) == 1 and ops.count(dp.rows_group_clipped_sum.default) == 1


def test_strategies_use_their_ops(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6, 4)
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="ghost")
    assert ops.count(dp.linear_ghost_norm.default) == 2 and ops.count(dp.linear_clipped_sum.default) == 2
    assert dp.linear_norm.default not in ops
    monkeypatch.undo()
    no_bias = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    ops = _rewritten_graph(no_bias, x, monkeypatch, clipping="per_layer", strategy="single_pass")
    assert ops.count(dp.linear_single_pass.default) == 2
    assert dp.linear_norm.default not in ops and dp.linear_clipped_sum.default not in ops
    monkeypatch.undo()
    # with a bias, single_pass runs as its factor_apart form (stored's products): the group's factor and the bias's
    # sum come from one op, the weight's row norms as its `rest`, and the products are reduced with that factor
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="single_pass")
    assert ops.count(dp.linear_tiles.default) == 2 and ops.count(dp.rows_group_clipped_sum.default) == 2
    assert ops.count(dp.tiles_clipped_sum.default) == 2 and dp.linear_single_pass.default not in ops
    monkeypatch.undo()
    # flat: one group, so single_pass can serve one of its two linear sites only
    ops = _rewritten_graph(no_bias, x, monkeypatch, clipping="flat", strategy={"0.weight": "single_pass"})
    assert ops.count(dp.linear_single_pass.default) == 1 and ops.count(dp.linear_clipped_sum.default) == 1
    monkeypatch.undo()
    ops = _rewritten_graph(model, x, monkeypatch, clipping="flat", strategy={"0.weight": "single_pass"})
    assert ops.count(dp.linear_tiles.default) == 1 and ops.count(dp.linear_clipped_sum.default) == 1
    assert ops.count(dp.tiles_clipped_sum.default) == 1  # two weights in the group: the factor from (B,) norms
    assert ops.count(dp.rows_group_clipped_sum.default) == 1 and dp.linear_single_pass.default not in ops
    monkeypatch.undo()
    # two_pass: the products formed for the norm, then again for the clipped sum
    ops = _rewritten_graph(model, x, monkeypatch, clipping="flat", strategy="two_pass")
    assert ops.count(dp.linear_tile_norm.default) == 2 and ops.count(dp.linear_tile_clipped_sum.default) == 2
    assert dp.linear_norm.default not in ops and dp.linear_clipped_sum.default not in ops
    monkeypatch.undo()
    # stored: the products formed once for the norm, kept, and reduced once the factor is known
    ops = _rewritten_graph(model, x, monkeypatch, clipping="flat", strategy="stored")
    assert ops.count(dp.linear_tiles.default) == 2 and ops.count(dp.tiles_clipped_sum.default) == 2
    assert dp.linear_tile_norm.default not in ops and dp.linear_clipped_sum.default not in ops
    monkeypatch.undo()
    # a budget below one sample's product: the chunked form
    ops = _rewritten_graph(model, x, monkeypatch, clipping="per_layer", strategy="single_pass",
                           single_pass_budget_mb=1e-6)
    assert ops.count(dp.linear_single_pass_chunked.default) == 2 and dp.linear_single_pass.default not in ops
    assert dp.rows_group_clipped_sum.default not in ops  # the chunked op forms the factor: the biases keep theirs


def test_a_stored_weight_hands_its_row_norms_to_its_bias_op(monkeypatch):
    """A layer whose weight keeps its products (stored, or single_pass beside a bias): the weight's squared norms
    reach the bias's rows op as (B, d_in) row parts read straight from linear_tiles (no reduction between them),
    and the products of the same call are reduced with the op's factor; a flat group (two weights) sums its norms
    to (B,) first."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6, 4)
    for options, rest_dims in (({"clipping": "per_layer", "strategy": "single_pass"}, {2}),
                               ({"clipping": "per_layer", "strategy": "stored"}, {2}),
                               ({"clipping": "flat", "strategy": "stored"}, {1})):
        nodes = _rewritten_graph(model, x, monkeypatch, nodes=True, **options)
        rows_ops = [n for n in nodes if n.target is dp.rows_group_clipped_sum.default]
        assert rows_ops, options
        rests = [n.args[1] for n in rows_ops]
        assert {r.meta["val"].dim() for r in rests} == rest_dims, options
        if rest_dims == {2}:
            assert all(r.target is operator.getitem and r.args[0].target is dp.linear_tiles.default for r in rests)
            sums = [n for n in nodes if n.target is dp.tiles_clipped_sum.default]
            assert len(sums) == len(rows_ops)
            for n, total in zip(rows_ops, sums):  # the products of the same linear_tiles call, the op's factor
                products, coef = total.args
                assert products.target is operator.getitem and products.args[0] is n.args[1].args[0]
                assert coef.target is operator.getitem and coef.args[0] is n and coef.args[1] == 0
        monkeypatch.undo()


def test_no_kept_whole_op_survives_for_inductor(monkeypatch):
    """B == 1 keeps each gradient as it is (it is sample 0's): the embedding backward the DP table keeps whole must
    still be decomposed, or Inductor refuses to lower it."""
    import models

    case = models.gpt_like(tied=True)
    for B in (1, 3):
        ops = _rewritten_graph(case.model, case.batch(B)[0], monkeypatch, clipping="flat")
        assert aten.embedding_dense_backward.default not in ops, B
        monkeypatch.undo()


def test_randomized_sites_draw_one_seed_per_call(monkeypatch):
    """strategy='randomized': the probe seed is an input of the graph (the backend appends it; each call that can
    backpropagate draws its own, none without grad), read only by the backward's estimates; one randomized norm per linear weight site with distinct site ids: from the stored per-sample products where stored
    may keep them (M N <= T (M + N): T = 6 here), else from the rows with two_pass's clipped sum while the products
    fit the budget (T = 2) and our clipped-sum GEMM beyond it; Inductor's inlining replaces the randomized norm ops
    by their bodies."""
    from dpcompile.codegen import randomized_ops as RO

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6, 4)
    drawn = []
    monkeypatch.setattr(RO, "next_probe_seed", lambda draw=RO.next_probe_seed: drawn.append(draw()) or drawn[-1])
    graphs = []

    def capture(graph, ctx):
        run(graph, ctx)
        graphs.append((graph, dict(ctx.randomized)))

    run = backend.run_dp_pass
    monkeypatch.setattr(backend, "run_dp_pass", capture)
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", strategy="randomized", clipping="per_layer")
    with torch.no_grad():
        compiled(x)
    assert drawn == []
    compiled(x).pow(2).sum().backward()
    assert len(drawn) == 1
    compiled(x).pow(2).sum().backward()
    compiled(x[:3]).pow(2).sum().backward()
    assert len(drawn) == 3 and len(set(drawn)) == 3  # every call (micro-batch) its own fresh seed
    ((graph, randomized),) = graphs
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    (seed,) = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].dtype == torch.int64]
    assert {u.target for u in seed.users} == {dp.persample_norm_randomized.default}
    assert ops.count(dp.persample_norm_randomized.default) == 2 and ops.count(dp.linear_products.default) == 2
    assert dp.linear_tiles.default not in ops  # no exact norm beside the estimate
    assert ops.count(dp.tiles_clipped_sum.default) == 2 and dp.linear_norm_randomized.default not in ops
    # biases stay exact: their column sums' norms, with the estimates as `rest`
    assert ops.count(dp.rows_group_clipped_sum.default) == 2 and dp.linear_norm.default not in ops
    sites = sorted(n.args[4] for n in graph.nodes if n.target is dp.persample_norm_randomized.default)
    assert sites == [0, 1] and sorted(randomized.values()) == [0, 1]
    monkeypatch.undo()
    ops = _rewritten_graph(model, x, monkeypatch, inline=True, strategy="randomized", clipping="per_layer")
    assert dp.persample_norm_randomized.default not in ops
    monkeypatch.undo()
    ops = _rewritten_graph(model, x[:, :2], monkeypatch, strategy="randomized", clipping="per_layer")
    assert ops.count(dp.linear_norm_randomized.default) == 2 and ops.count(dp.linear_tile_clipped_sum.default) == 2
    assert dp.linear_tile_norm.default not in ops and dp.linear_clipped_sum.default not in ops
    assert dp.persample_norm_randomized.default not in ops and dp.linear_products.default not in ops
    monkeypatch.undo()
    ops = _rewritten_graph(model, x, monkeypatch, strategy="randomized", clipping="flat", single_pass_budget_mb=1e-4)
    assert ops.count(dp.linear_norm_randomized.default) == 2 and ops.count(dp.linear_clipped_sum.default) == 2
    assert dp.linear_tile_clipped_sum.default not in ops
    monkeypatch.undo()
    # a batch of one: the weight-gradient products are estimated with the same law
    ops = _rewritten_graph(model, x[:1], monkeypatch, strategy="randomized", clipping="flat")
    assert ops.count(dp.persample_norm_randomized.default) == 2
    monkeypatch.undo()
    # nothing randomized where nothing asks for it
    ops = _rewritten_graph(model, x, monkeypatch, strategy={"2.*": "randomized"}, clipping="flat")
    assert ops.count(dp.persample_norm_randomized.default) == 1
    monkeypatch.undo()
    ops = _rewritten_graph(model, x, monkeypatch, clipping="flat")
    assert dp.linear_norm_randomized.default not in ops and dp.persample_norm_randomized.default not in ops


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
          aten.transpose.int, aten.t.default, aten.expand.default, aten.alias.default, aten.unsqueeze.default,
          aten.squeeze.dim}


def _operands_die_before_the_sums(graph, norm_op, sum_op) -> bool:
    """Whether every linear site's operands (and whatever they are views of) have their last use before the first
    clipped sum: what flat clipping keeps until its factor is known is then the norm op's output alone."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_sum = min(order[n] for n in graph.nodes if n.target is sum_op)
    for n in graph.nodes:
        if n.target is not norm_op:
            continue
        stack, group = list(n.args[:2]), set()
        while stack:  # the operand, the values it is a view of, and the other views of those
            m = stack.pop()
            if not isinstance(m, torch.fx.Node) or m in group:
                continue
            group.add(m)
            if m.target in _VIEWS:
                stack.append(m.args[0])
            stack.extend(u for u in m.users if u.target in _VIEWS)
        if any(order[u] > first_sum for m in group for u in m.users):
            return False
    return True


def test_stored_drops_the_operands_two_pass_keeps(monkeypatch):
    """The planner offers stored only where the products are no larger than the operands (M N <= T (M + N)),
    because the operands then die at the norm: under flat clipping two_pass keeps them until the factor is known."""
    graphs = []

    def capture(graph, ctx):
        run(graph, ctx)
        graphs.append(graph)

    run = backend.run_dp_pass
    monkeypatch.setattr(backend, "run_dp_pass", capture)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for strategy in ("stored", "two_pass"):
        torch._dynamo.reset()
        dpcompile.compile(model, backend="flashdp_eager", clipping="flat", strategy=strategy,
                          loss_reduction="sum")(torch.randn(5, 6, 4)).pow(2).sum().backward()
    stored, two_pass = graphs
    assert _operands_die_before_the_sums(stored, dp.linear_tiles.default, dp.tiles_clipped_sum.default)
    assert not _operands_die_before_the_sums(two_pass, dp.linear_tile_norm.default,
                                             dp.linear_tile_clipped_sum.default)


def test_verify_finds_a_replaced_gradient_that_still_feeds_an_output():
    """The coverage check's dependence test (walked forward from the replaced gradient): a path through any number
    of ops is found, a dead or side branch is not."""
    from torch import fx

    from dpcompile.passes.verify import _depends_on

    g = fx.Graph()
    x = g.placeholder("x")
    original = g.call_function(torch.ops.aten.mm.default, (x, x))  # the unclipped gradient the rewrite replaced
    side = g.call_function(torch.ops.aten.relu.default, (original,))
    clipped = g.call_function(torch.ops.aten.neg.default, (x,))
    out = g.call_function(torch.ops.aten.add.Tensor, (clipped, x))
    g.output((out, side))
    assert not _depends_on(out, original)
    assert _depends_on(side, original)
    leak = g.call_function(torch.ops.aten.mul.Tensor, (side, 2.0))
    out.replace_input_with(x, leak)  # now the unclipped gradient reaches `out` through relu and mul
    assert _depends_on(out, original)
    assert not _depends_on(original, out)
