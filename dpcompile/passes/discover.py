"""From each trainable parameter's gradient output down to the sites that contract the batch.

A parameter gradient is a sum of contributions (one per use of the parameter). Each contribution is a site
(patterns.py) followed by a chain of ops that are linear in it and do not touch samples: reshapes, permutes,
dtype casts, scaling by batch-free values, scatters by batch-free indices (position embeddings). Anything else on
the path is refused with an error naming the parameter and the op.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..errors import SampleMixingError, SymbolicLayoutError, UnsupportedGradientError
from .batchdim import BDim, Mixed, node_location
from .chain import Step
from .patterns import Site, classify_leaf, op_name
from .sites import kinds, match, site_kind
from .sites import embedding_bag, mapped  # noqa: F401  (registers the kinds)

aten = torch.ops.aten
prims = torch.ops.prims

# ops through which a contribution passes unchanged in norm (up to a constant factor)
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
    prims.convert_element_type.default, aten._to_copy.default, aten.neg.default,
}
# linear ops that may change the norm: need the materialized per-sample path
_LINEAR_OPS = {
    aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar, aten.sum.dim_IntList,
    aten.embedding_dense_backward.default, aten.index_put.default, aten._unsafe_index_put.default,
    aten._unsafe_masked_index_put_accumulate.default, aten.mm.default, aten.expand.default,
}


@dataclass
class Contribution:
    site: Site
    chain: list  # list[Step], from the site up to the parameter gradient
    negate: bool = False  # reached through the right operand of a sub

    @property
    def norm_preserving(self) -> bool:
        return all(s.node.target in _SHAPE_OPS or _scalar_factor(s) is not None or _places_into_zeros(s)
                   for s in self.chain)

    @property
    def scale(self) -> float:
        f = 1.0
        for s in self.chain:
            k = _scalar_factor(s)
            if k is not None:
                f *= k
        return abs(f)


def _scalar_factor(step: Step) -> Optional[float]:
    n = step.node
    if n.target in (aten.mul.Tensor, aten.mul.Scalar) and len(n.args) == 2:
        other = n.args[1 - step.pos]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return float(other)
    if n.target in (aten.div.Tensor, aten.div.Scalar) and step.pos == 0 and isinstance(n.args[1], (int, float)):
        return 1.0 / float(n.args[1]) if n.args[1] != 0 else None
    return None


@dataclass(eq=False)
class ParamGrad:
    """One trainable parameter's gradient in the joint graph: the site record the pass plans and rewrites.
    Compared and hashed by identity (eq=False), so the record itself keys the planner's and rewriter's dicts."""

    name: str  # FQN
    placeholder: fx.Node
    out_pos: int  # position in the joint graph's output tuple
    grad: fx.Node
    contributions: list = field(default_factory=list)

    @property
    def fused(self) -> bool:
        """One contribution through a norm-preserving chain: the site's own norm and clipped-sum ops apply."""
        return (len(self.contributions) == 1 and self.contributions[0].norm_preserving
                and site_kind(self.contributions[0].site.kind).fused)


def discover_contributions(pg: ParamGrad, st: Callable, batch_size) -> None:
    """Fill pg.contributions by walking down from pg.grad (batch_size: the symbolic B)."""

    def walk(node, chain: list, negate: bool, out: list):
        if not isinstance(node, fx.Node):
            raise UnsupportedGradientError(f"gradient of parameter `{pg.name}` has a constant term {node!r}")
        state = st(node)
        if state is None:
            raise UnsupportedGradientError(
                f"gradient of parameter `{pg.name}` has a term that does not depend on the batch, at op "
                f"`{node.name}` ({op_name(node.target)}){node_location(node)}; a data-independent term (a regulariser "
                "in the loss) has no per-sample gradient: apply it in the optimizer (weight_decay) instead"
            )
        if isinstance(state, BDim) or _is_contraction(node, st):
            site = classify_leaf(node, st, pg.name)
            out.append(Contribution(site, list(reversed(chain)), negate))
            return
        t = node.target
        if t is aten.add.Tensor and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) \
                and node.kwargs.get("alpha", 1) == 1:
            for a in node.args:
                walk(a, chain, negate, out)
            return
        if t is aten.sub.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            walk(node.args[0], chain, negate, out)
            walk(node.args[1], chain, not negate, out)
            return
        if t in _SHAPE_OPS or t in _LINEAR_OPS:
            pos = _contribution_arg(node, st, pg.name)
            walk(node.args[pos], chain + [Step(node, pos)], negate, out)
            return
        branches = mapped.where_branches(node, st)
        if branches:  # where(c, g, g * s) with c batch-free: each branch's terms through its own map
            for pos in branches:
                inner: list = []
                walk(node.args[pos], [], False, inner)
                for c in inner:
                    out.append(Contribution(mapped.where_site(node, pos, _absorbed(c, batch_size)),
                                            list(reversed(chain)), negate))
            return
        pieces = mapped.cat_pieces(node, st)
        if pieces:  # cat([g_0, g_1, ...]): the backward of splitting the parameter, each piece placed per sample
            for j in pieces:
                inner = []
                walk(node.args[0][j], [], False, inner)
                for c in inner:
                    out.append(Contribution(mapped.cat_site(node, j, _absorbed(c, batch_size)),
                                            list(reversed(chain)), negate))
            return
        mapping = mapped.map_of(node)
        if mapping is not None and _map_operand_ok(mapping, st):
            # a fixed linear map of a gradient summed over the batch (the backward of slicing the parameter, of
            # weight_norm): each contribution of the mapped gradient becomes one site with the map applied per sample
            op, pos = mapping
            inner: list = []
            walk(op.args[pos], [], False, inner)
            for c in inner:
                out.append(Contribution(mapped.site_of(node, op, pos, _absorbed(c, batch_size)),
                                        list(reversed(chain)), negate))
            return
        summed = _summed_before(node, state, st)
        if summed is not None:
            raise UnsupportedGradientError(
                f"gradient of parameter `{pg.name}` is summed over the batch at op `{summed.name}` ({op_name(summed.target)}) "
                f"and then goes through op `{node.name}` ({op_name(node.target)}){node_location(node)}, which dpcompile "
                "cannot apply to each sample's gradient separately; samples do not mix before it, but the pass has "
                "no per-sample rule for that op: keep the parameter frozen, restructure the op, or add a site kind "
                "(docs/extending.md)")
        raise _mixing_error(pg.name, node, state)

    found: list = []
    walk(pg.grad, [], False, found)
    pg.contributions = [_absorbed(c, batch_size) for c in found]
    if len(pg.contributions) == 1:
        pg.contributions = [_unwrapped(pg.contributions[0])]


def _unwrapped(c: Contribution) -> Contribution:
    """A parameter's only contribution, a slice site around a fused site through a norm-preserving chain
    (pos[:T] of a learned position table): the scatter into zeros keeps each sample's norm, so it becomes a step of
    the chain (replayed on the clipped sum) and the inner site is fused."""
    inner = mapped.inner_of(c.site)
    if inner is None or c.site.node.target not in _PLACES or inner.negate:
        return c
    inner = _unwrapped(inner)
    if not (inner.norm_preserving and site_kind(inner.site.kind).fused):
        return c
    new = Contribution(inner.site, inner.chain + [Step(c.site.node, 1)] + c.chain, c.negate)
    return new if new.norm_preserving else c


_PLACES = (aten.slice_scatter.default, aten.select_scatter.default)


def _places_into_zeros(step: Step) -> bool:
    """A slice_scatter / select_scatter of the contribution into zeros (discover only makes such steps where the
    base is a batch-free zero fill): each sample's gradient keeps its norm."""
    return step.node.target in _PLACES and step.pos == 1 and mapped.places_into_zeros(step.node)


def _summed_before(node: fx.Node, state, st) -> Optional[fx.Node]:
    """The site (an op some kind recognises, contracting per-sample operands) whose batch sum is the only value
    `node` reads that depends on samples, through ops that each read nothing else that does: ops after the sum that
    the walk does not know, which mix nothing themselves. None otherwise."""
    if not isinstance(state, Mixed) or state.unknown:
        return None
    x = node
    for _ in range(64):
        carrying = [a for a in x.all_input_nodes if st(a) is not None]
        if len(carrying) != 1:
            return None
        x = carrying[0]
        if x is state.origin:
            return x if _is_contraction(x, st) and match(x) is not None else None
    return None


def _map_operand_ok(mapping, st) -> bool:
    """The mapped gradient is the op's only operand that depends on samples."""
    op, pos = mapping
    others = []
    fx.node.map_arg(([a for i, a in enumerate(op.args) if i != pos], op.kwargs), lambda n: others.append(n) or n)
    return isinstance(op.args[pos], fx.Node) and st(op.args[pos]) is not None and all(st(n) is None for n in others)


def _absorbed(c: Contribution, batch_size) -> Contribution:
    """c as the first kind that recognises it as one of its own sites (SiteKind.absorb), or c."""
    for kind in kinds():
        if kind.absorb is not None:
            new = kind.absorb(c, batch_size)
            if new is not None:
                return new
    return c


def _is_contraction(node: fx.Node, st: Callable) -> bool:
    """A node that sums over samples whose inputs are all per-sample or batch-free (for one output of a
    multi-output op, such as convolution_backward, the op's inputs)."""
    if not isinstance(st(node), Mixed):
        return False
    op = node.args[0] if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else node
    inputs = []
    fx.node.map_arg((op.args, op.kwargs), lambda n: inputs.append(n) or n)
    return all(not isinstance(st(a), Mixed) and not isinstance(st(a), tuple) for a in inputs) and any(
        isinstance(st(a), BDim) for a in inputs
    )


def _contribution_arg(node: fx.Node, st: Callable, name: str) -> int:
    """Index of the one argument that carries the (batch-summed) contribution; the others must be batch-free."""
    carrying = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and st(a) is not None]
    others = []
    fx.node.map_arg(node.kwargs, lambda n: others.append(n) or n)
    if len(carrying) != 1 or any(st(a) is not None for a in others):
        raise _mixing_error(name, node, st(node))
    pos = carrying[0]
    if node.target in (aten.div.Tensor, aten.div.Scalar) and pos != 0:
        raise _mixing_error(name, node, st(node))
    if node.target is aten.index_put.default or node.target is aten._unsafe_index_put.default:
        if pos != 2:
            raise _mixing_error(name, node, st(node))
    if node.target is aten.embedding_dense_backward.default and (pos != 0 or node.args[4]):
        raise _mixing_error(name, node, st(node))
    if node.target is aten._unsafe_masked_index_put_accumulate.default and pos != 3:
        raise _mixing_error(name, node, st(node))
    return pos


def _experts_hint(origin: fx.Node) -> str:
    """A sort inside a mixture-of-experts layer: transformers' grouped_mm experts path, which has an exact twin."""
    if origin.target is not aten.sort.default:
        return ""
    stack = origin.meta.get("nn_module_stack") or {}
    classes = [getattr(cls, "__name__", str(cls)) for _, cls in stack.values()]
    if not any(c.endswith("Experts") for c in classes) and "integrations/moe" not in origin.meta.get("stack_trace", ""):
        return ""
    return (" This looks like transformers' `grouped_mm` experts path, which sorts the (token, expert) pairs of the "
            "whole batch: call `dpcompile.hf.per_token_experts(model)` before compiling (dpcompile.compile, "
            "CausalLMLoss, DPTrainer and `dpcompile train` do) to run the experts per token, which is clipped "
            "exactly.")


def _mixing_error(name: str, node: fx.Node, state) -> Exception:
    where = f"op `{node.name}` ({op_name(node.target)}){node_location(node)}"
    if isinstance(state, Mixed) and state.symbolic:
        return SymbolicLayoutError(
            f"gradient of parameter `{name}` goes through {where}, which depends on {state.describe()}")
    if isinstance(state, Mixed) and state.unknown:
        return UnsupportedGradientError(
            f"gradient of parameter `{name}` goes through {where}, which depends on {state.describe()}; "
            "dpcompile cannot prove that op keeps samples apart, so it refuses rather than risk a non-private "
            "gradient"
        )
    if isinstance(state, Mixed) and state.origin is not node:
        return SampleMixingError(
            f"gradient of parameter `{name}` is not per-sample separable: {where} uses a value that combines "
            f"samples — {state.describe()}.{_experts_hint(state.origin)} BatchNorm in training mode, in-batch "
            "losses and loss normalisers "
            "computed over the whole batch all do this; use per-sample normalisation (GroupNorm/LayerNorm) and a "
            "loss that is a sum or a mean over samples of per-sample losses. Note: F.cross_entropy / nll_loss "
            "with the default reduction='mean' divide by the number of non-ignored targets in the whole batch "
            "(ignore_index): write F.cross_entropy(..., reduction='sum') / batch_size, or take each sample's "
            "token mean and then the mean over samples"
        )
    reason = f" ({state.reason})" if isinstance(state, Mixed) else ""
    return UnsupportedGradientError(
        f"gradient of parameter `{name}` goes through {where}{reason}, which dpcompile cannot put on a "
        "per-sample clipped path"
    )
