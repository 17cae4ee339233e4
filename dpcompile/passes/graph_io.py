"""Reading the joint graph: which placeholder is which Dynamo input, where each parameter's gradient is in the
outputs, which forward output each tangent belongs to, and the graph's symbolic sizes (batch symbol, size hints)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .batchdim import BDim
from .symbolic import graph_shape_env, guard_batch_sizes, size_hint, sym_expr
from .discover import ParamGrad


@dataclass
class GraphIO:
    """The joint graph's inputs and outputs as the pass sees them."""

    primals: dict  # Dynamo input index -> primal placeholder
    params: list  # (ParamInfo, ParamGrad) of every trainable parameter with a gradient output
    index_of: dict  # ParamGrad -> Dynamo input index
    batch_node: fx.Node
    batch_dim: int
    batch_size: object  # sympy expression (or int) of B

    @property
    def batch_extent(self):
        """The batch input's size on its sample dim, as the fake value has it (int or SymInt)."""
        return self.batch_node.meta["val"].shape[self.batch_dim]


def read_graph(graph: fx.Graph, ctx) -> GraphIO:
    """The trainable parameters' gradient outputs and the batch input; guards that every batch input has one B."""
    primals = primal_placeholders(graph)
    positions = grad_output_positions(graph, len(primals))
    outs = list(graph.output_node().args[0])
    params, index_of = [], {}
    for idx, info in ctx.params.items():
        pos = positions.get(idx)
        grad = outs[pos] if pos is not None else None
        if isinstance(grad, fx.Node):
            pg = ParamGrad(info.name, primals[idx], pos, grad)
            params.append((info, pg))
            index_of[pg] = idx
    batch_idx, batch_dim = next(iter(ctx.batch_inputs.items()))
    batch_node = primals[batch_idx]
    guard_batch_sizes(graph_shape_env(graph), batch_node.meta["val"].shape[batch_dim],
                      [primals[i].meta["val"].shape[d] for i, d in ctx.batch_inputs.items() if i != batch_idx])
    return GraphIO(primals, params, index_of, batch_node, batch_dim,
                   sym_expr(batch_node.meta["val"].shape[batch_dim]))


def _input_index(node: fx.Node, position: int) -> int:
    desc = node.meta.get("desc")
    idx = getattr(desc, "idx", None)
    return idx if isinstance(idx, int) else position


def primal_placeholders(graph: fx.Graph) -> dict:
    """Dynamo input index -> primal placeholder."""
    primals = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    return {_input_index(n, i): n for i, n in enumerate(primals)}


def grad_output_positions(graph: fx.Graph, n_primals: int) -> dict:
    """Dynamo input index -> position of its gradient in the joint graph's outputs."""
    out = graph.output_node()
    outs = list(out.args[0])
    descs = out.meta.get("desc")
    positions = {}
    if descs and len(descs) == len(outs):
        for pos, d in enumerate(descs):
            grad_of = getattr(d, "grad_of", None)
            if grad_of is not None and isinstance(getattr(grad_of, "idx", None), int):
                positions[grad_of.idx] = pos
        if positions:
            return positions
    first = len(outs) - n_primals
    return {k: first + k for k in range(n_primals)}


def tangent_outputs(graph: fx.Graph, n_primals: int) -> list:
    """(tangent placeholder, the forward output it is the gradient of, or None) for every tangent."""
    out = graph.output_node()
    outs = list(out.args[0])
    descs = out.meta.get("desc") or [None] * len(outs)
    tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    fw = [(o, d) for o, d in zip(outs[: len(outs) - n_primals], descs) if isinstance(o, fx.Node)]
    pairs = []
    for i, t in enumerate(tangents):
        target = getattr(t.meta.get("desc"), "output", None)
        match = [o for o, d in fw if d is not None and d == target]
        if not match and i < len(fw):
            match = [fw[i][0]]
        pairs.append((t, match[0] if match else None))
    return pairs


def tangent_seeds(graph: fx.Graph, states: dict, n_primals: int) -> dict:
    """Each tangent carries samples the way its forward output does (a scalar loss's tangent carries none)."""
    seeds = {}
    for t, output in tangent_outputs(graph, n_primals):
        s = states.get(output) if output is not None else None
        seeds[t] = s if isinstance(s, BDim) else None
    return seeds


def dependents(graph: fx.Graph, roots: set) -> set:
    """The nodes that depend on any of `roots` (roots included)."""
    dep = set(roots)
    for n in graph.nodes:
        if n not in dep and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def batch_symbol(size):
    """(sympy symbol or None, a representative value) of the graph's batch size."""
    if isinstance(size, torch.SymInt):
        expr = sym_expr(size)
        hint = size.node.hint if size.node.hint is not None else 8
        return (expr if expr.free_symbols else None), int(hint)
    return None, int(size)


def size_hints(graph: fx.Graph) -> dict:
    """symbol -> its value at the call that compiled the graph (the ShapeEnv's hints; no guard is added), for the
    planner's choices: a choice made at these sizes stays exact at every other size."""
    shape_env = graph_shape_env(graph)
    if shape_env is None:
        return {}
    symbols = set()
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            symbols.update(sym for s in val.shape for sym in sym_expr(s).free_symbols)
    return {sym: size_hint(sym, shape_env) for sym in symbols}
