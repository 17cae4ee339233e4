"""Randomized norms in the graph (docs/randomized.md): one secret probe seed per call of the graph, an input the
backend appends, and a distinct site id for every parameter whose norm is estimated."""
from __future__ import annotations

import torch.fx as fx

from ..codegen import randomized_ops  # noqa: F401  (registers the randomized norm ops)
from ..errors import DPCompileError
from .one_sample import accounting
from .rewrite import RandomizedNorms


def randomized_norms(graph: fx.Graph, ctx, io, choices: dict, products: dict):
    """The graph's RandomizedNorms (None if no site is randomized); fills ctx.randomized (input index -> site id)."""
    pgs = [pg for _, pg in io.params if pg in products or
           (pg in choices and accounting(choices[pg].strategy) == "randomized")]
    if not pgs:
        return None
    randomized = RandomizedNorms(ctx.options.probes, ctx.options.probe_variant,
                                 probe_seed_node(ctx, io),
                                 {pg: i for i, pg in enumerate(pgs)}, products)
    for pg in pgs:
        ctx.randomized[io.index_of[pg]] = randomized.site_ids[pg]
    return randomized


def probe_seed_node(ctx, io) -> fx.Node:
    """The int64 (1,) probe seed the backend appends to the graph's inputs (backend._with_runtime_inputs): each
    call's wrapper passes a fresh secret one, which the backward's estimates read."""
    if ctx.seed_input is None or ctx.seed_input not in io.primals:
        raise DPCompileError("flashdp: this graph has randomized sites but no probe seed input; randomized norms "
                             "need the flashdp or flashdp_eager backend, which append it")
    return io.primals[ctx.seed_input]
