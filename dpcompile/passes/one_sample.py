"""The batch-of-one path: with one sample, each parameter's gradient is that sample's gradient (a `whole` site:
nothing can mix samples), and a linear weight site forced to a randomized strategy keeps the estimator it has in
larger batches (its weight-gradient mm is the one sample's product, probed by the same law)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..strategy_registry import find_strategy
from .symbolic import sym_expr
from .discover import _SHAPE_OPS, Contribution
from .graph_io import dependents
from .plan import check_randomizable
from .sites import whole


def accounting(strategy: str):
    """The accounting a strategy name declares (None: exact, "auto", or a kind's own strategy)."""
    record = find_strategy(strategy)
    return record.accounting if record else None


def whole_sites(params: list) -> None:
    """One `whole` contribution per parameter: the gradient value is sample 0's."""
    for _, pg in params:
        pg.contributions.append(Contribution(whole.site_of(pg.grad), []))


def randomized_products(graph: fx.Graph, params: list, ctx, primals: dict) -> dict:
    """Batch-size-1 graphs: pg -> (mm node, scale) for each parameter forced "randomized" whose gradient is, up
    to reshapes, casts and scalar factors, one mm whose operands carry the sample (the activations and the output
    gradient): the linear weight sites the batched graphs randomize. With one sample that mm's value is the
    sample's product s_0, whose norm is then estimated with the same law (dpcompile::persample_norm_randomized).
    Without this a sample would be clipped by its exact norm in a micro-batch of one and by an estimate in a
    larger one, and adding a sample to the data could change how the others are clipped. The batched graphs' own
    classification is compared with this one when both are compiled (privacy.optimizer), and a mismatch refused."""
    forced = [(info, pg) for info, pg in params if accounting(ctx.options.forced_strategy(info.name)) == "randomized"]
    if not forced:
        return {}
    aten = torch.ops.aten
    batch = dependents(graph, {primals[i] for i in ctx.batch_inputs})
    tangents = dependents(graph, {n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")})
    out = {}
    for info, pg in forced:
        node, scale = pg.grad, 1.0
        while isinstance(node, fx.Node):
            t = node.target
            if t in _SHAPE_OPS:
                node = node.args[0]
            elif t in (aten.mul.Tensor, aten.mul.Scalar) and len(node.args) == 2 and sum(
                    isinstance(a, fx.Node) for a in node.args) == 1 and all(
                    isinstance(a, fx.Node) or (isinstance(a, (int, float)) and not isinstance(a, bool))
                    for a in node.args):
                factor = next(a for a in node.args if not isinstance(a, fx.Node))
                scale *= float(factor)
                node = next(a for a in node.args if isinstance(a, fx.Node))
            elif t in (aten.div.Tensor, aten.div.Scalar) and isinstance(node.args[0], fx.Node) and isinstance(
                    node.args[1], (int, float)) and not isinstance(node.args[1], bool) and node.args[1] != 0:
                scale /= float(node.args[1])
                node = node.args[0]
            else:
                break
        if not (isinstance(node, fx.Node) and node.target is aten.mm.default):
            continue
        a, b = node.args[:2]
        if not all(isinstance(x, fx.Node) and (x in batch or x in tangents) for x in (a, b)) or \
                not (a in batch or b in batch):
            continue
        check_randomizable(info.name, sym_expr(a.meta["val"].shape[1]))  # A is (M, K): K = T rows of the sample
        out[pg] = (node, abs(scale))
    return out
