"""Which dim of every tensor in the joint graph carries samples, found by dataflow.

States (one per node; a tuple of states for nodes that return several tensors):
  None        the value does not depend on any sample's data (parameters, constants, the loss tangent,
              masks built from shapes). It may still have a batch-sized dim; per-sample code slices it
              positionally, like its batched partner.
  BDim(d, k)  along dim d, index i belongs to sample (i // k) % B. k = 1 for a plain batch dim; k = T for a
              batch-major flattened (B*T) dim; a time-major flattened (T*B) dim has k = 1 and an outer T.
  Mixed(...)  the value combines several samples: a reduction over the batch (the loss, or a parameter
              gradient contraction), an op that couples samples (BatchNorm statistics), or an op this analysis
              does not know applied to per-sample data. Mixed is only an error where it reaches a parameter
              gradient through something other than a recognised contraction (see discover.py).

Shapes are never used to *find* the batch dim: views are followed by exact index arithmetic over symbolic
sizes, so B == T, duck-sized symbols and size-1 dims cannot confuse it.

The rules live in passes/batchdim_rules/, one module per op family, each registered with `@batchdim_rule(*ops)`
(batchdim_states.py, which also holds the states); the engine below walks the graph, looks each op's rule up and
falls back to broadcasting for ops tagged pointwise, and to an unknown (Mixed) state for any other op.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from . import batchdim_rules  # noqa: F401  (registers the rules of every op family)
from .batchdim_rules.reductions import _REDUCTIONS  # noqa: F401  (re-exported: loss_reduction.py)
from .batchdim_states import (_HANDLERS, BDim, Mixed, State, _arg, _flatten_nodes,  # noqa: F401  (re-exported)
                              _flatten_states, _norm_dim, _packet_name, batchdim_rule, node_location, op_name,
                              rule_for)
from .symbolic import divides, graph_shape_env, rank_of, size_hint, statically_equal

__all__ = ["BatchDimAnalysis", "BDim", "Mixed", "State", "batchdim_rule", "rule_for", "node_location", "op_name",
           "_HANDLERS", "_REDUCTIONS", "_arg", "_flatten_nodes", "_flatten_states", "_norm_dim", "_packet_name"]


def _is_pointwise(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


class BatchDimAnalysis:
    """Run once over a joint graph; `state(node)` answers afterwards."""

    def __init__(self, graph: fx.Graph, seeds: dict, batch_size: sympy.Expr,
                 base: Optional["BatchDimAnalysis"] = None, changed: Optional[set] = None):
        """base, changed: an analysis of the same graph whose seeds differ from `seeds` only at placeholders in
        `changed`, which holds every node that depends on them (graph_io.dependents); the other nodes' states are
        base's, since a state is a function of the node's inputs' states only (trying one input's layouts
        reanalyses only what that input reaches)."""
        self.graph = graph
        self.B = batch_size
        self.shape_env = graph_shape_env(graph) if base is None else base.shape_env
        self.states: dict[fx.Node, State] = {}
        for node in graph.nodes:
            if base is not None and node not in changed:
                if node in base.states:
                    self.states[node] = base.states[node]
            elif node.op == "placeholder":
                self.states[node] = seeds.get(node)
            elif node.op == "call_function":
                try:
                    self.states[node] = self._rule(node)
                except Exception as e:  # a rule that trips on an odd signature must not pass silently
                    self.states[node] = self._unknown(node, f"batch-dim rule failed ({type(e).__name__}: {e})")

    def state(self, node: Any) -> State:
        if isinstance(node, fx.Node):
            return self.states.get(node)
        return None

    # -- helpers ------------------------------------------------------------------------------------------
    def _first_mixed(self, node: fx.Node) -> Optional[Mixed]:
        for a in _flatten_nodes((node.args, node.kwargs)):
            s = self.state(a)
            for leaf in _flatten_states(s):
                if isinstance(leaf, Mixed):
                    return leaf
        return None

    def _any_batched(self, node: fx.Node) -> bool:
        return any(
            isinstance(leaf, BDim)
            for a in _flatten_nodes((node.args, node.kwargs))
            for leaf in _flatten_states(self.state(a))
        )

    def _unknown(self, node: fx.Node, why: str) -> Mixed:
        return Mixed(node, why, unknown=True)

    def _mix(self, node: fx.Node, why: str) -> Mixed:
        return Mixed(node, why)

    # -- the rule dispatcher --------------------------------------------------------------------------------
    def _rule(self, node: fx.Node) -> State:
        t = node.target
        if t is operator.getitem:
            s = self.state(node.args[0])
            if isinstance(s, tuple):
                return s[node.args[1]]
            return s
        mixed = self._first_mixed(node)
        if mixed is not None:
            # anything computed from a value that combines samples combines them too
            return mixed
        if not self._any_batched(node):
            return None  # a function of batch-free values is batch-free
        handler = rule_for(t)  # batchdim_rules/: by op, else by overload packet name (attention, pooling)
        if handler is not None:
            return handler(self, node)
        if _is_pointwise(t):
            return self._pointwise(node)
        return self._unknown(node, "an op the batch-dim analysis does not know, applied to per-sample data")

    # -- the generic rules, which the registered ones also call ----------------------------------------------
    def _pointwise(self, node: fx.Node, operands: Optional[Sequence] = None, out_rank: Optional[int] = None) -> State:
        """Broadcasting alignment (right-aligned dims); all batched operands must agree."""
        out_rank = rank_of(node) if out_rank is None else out_rank
        found = None
        for a in operands if operands is not None else _flatten_nodes((node.args, node.kwargs)):
            s = self.state(a)
            if not isinstance(s, BDim):
                continue
            r = rank_of(a)
            aligned = BDim(s.dim + out_rank - r, s.inner)
            if found is None:
                found = aligned
            elif found != aligned:
                return self._mix(node, "an elementwise op combines different samples")
        return found

    def _quotient(self, num: sympy.Expr, den: sympy.Expr) -> Optional[sympy.Expr]:
        """num / den where it is an integer for every size the graph accepts, else None. Beyond polynomial
        division, the ShapeEnv's guards count: a model that feeds a flattened (C, H, W) to a Linear fixes C*H*W
        (a guard) but not H and W, and the backward's view back to (C, H, W) is one sample's block only by it."""
        if divides(den, num):
            return sympy.cancel(num / den)
        if self.shape_env is None:
            return None
        try:
            n, d = size_hint(num, self.shape_env), size_hint(den, self.shape_env)
        except Exception:  # a size without a hint (unbacked): unknown
            return None
        if d == 0 or n % d:
            return None
        q = sympy.Integer(n // d)
        return q if statically_equal(num, den * q, self.shape_env) else None
