"""Randomized norms in the graph (docs/randomized.md): one secret probe seed per call of the graph, inserted after
the placeholders, and a distinct site id for every parameter whose norm is estimated."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..codegen import randomized_ops  # noqa: F401  (registers dpcompile::probe_seed and the randomized norm ops)
from .one_sample import accounting
from .rewrite import RandomizedNorms, insert_traced


def randomized_norms(graph: fx.Graph, ctx, io, choices: dict, products: dict):
    """The graph's RandomizedNorms (None if no site is randomized); fills ctx.randomized (input index -> site id)."""
    pgs = [pg for _, pg in io.params if pg in products or
           (pg in choices and accounting(choices[pg].strategy) == "randomized")]
    if not pgs:
        return None
    randomized = RandomizedNorms(ctx.options.probes, ctx.options.probe_variant,
                                 insert_probe_seed(graph, ctx, io.batch_node),
                                 {pg: i for i, pg in enumerate(pgs)}, products)
    for pg in pgs:
        ctx.randomized[io.index_of[pg]] = randomized.site_ids[pg]
    return randomized


def insert_probe_seed(graph: fx.Graph, ctx, batch_node: fx.Node) -> fx.Node:
    """One dpcompile::probe_seed node, right after the placeholders: it runs on every call of the graph (an
    opaque op tagged nondeterministic_seeded: never folded, merged or cached). Its `like` input is a tangent on
    the batch's device where there is one, so that the seed is drawn in the backward (a forward alone draws none)."""
    device = batch_node.meta["val"].device
    like = next((n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")
                 and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device == device), batch_node)
    k, variant = ctx.options.probes, ctx.options.probe_variant

    def draw(x):
        return [torch.ops.dpcompile.probe_seed(x, k, variant)]

    (seed,) = insert_traced(graph, draw, [like], ctx.decompositions)
    return seed
