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
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from .symbolic import (_provably_positive, contiguous_strides, divides, graph_shape_env, prod, rank_of, size_hint,
                       sizes_of, statically_equal,
                       sym_expr)

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass(frozen=True)
class BDim:
    dim: int
    inner: Any = sympy.Integer(1)  # sympy expression


@dataclass(frozen=True)
class Mixed:
    origin: fx.Node
    reason: str
    unknown: bool = False  # True: not known to mix samples, but not understood either
    #: True: understood at the traced sizes, but not provable for every value of the symbolic sizes (a length padded
    #: to a multiple of a chunk, then split into chunks: FloorDiv / Mod): refused as SymbolicLayoutError, which
    #: dpcompile.compile answers by recompiling with static sequence dims
    symbolic: bool = False

    def describe(self) -> str:
        return f"{self.reason} at op `{self.origin.name}` ({op_name(self.origin.target)}){node_location(self.origin)}"


State = Any  # None | BDim | Mixed | tuple of states


def op_name(target) -> str:
    """An op's name as messages and explain print it (aten.mm.default -> "mm.default")."""
    return getattr(target, "__name__", None) or str(target)


def node_location(node: fx.Node) -> str:
    """A short 'from <module> (<file:line>)' hint for error messages, when Dynamo recorded one."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = getattr(cls, "__name__", str(cls)).split(".")[-1]
        parts.append(f"in {cls_name} `{_clean_module_path(path)}`")
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().strip("^~ ")]
        if lines:
            parts.append(f"code: {lines[-1]}")
    return (" " + "; ".join(parts)) if parts else ""


def _clean_module_path(path: str) -> str:
    # L['self']._modules['fc1']  ->  fc1
    import re

    names = re.findall(r"_modules\['([^']+)'\]", path)
    if names:
        return ".".join(names)
    return path


# ----------------------------------------------------------------------------------------------------------
# symbolic size helpers


def _is_pointwise(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


_IDENTITY_OPS = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
    aten._to_copy.default, aten.lift_fresh_copy.default, prims.convert_element_type.default,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.dropout.default,
    aten.gelu_backward.default, aten.threshold_backward.default, aten.silu_backward.default,
}

_BATCH_FREE_FACTORIES = {
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default, aten.new_full.default, aten.empty_strided.default, aten.new_empty_strided.default, aten.sym_size.int,
    aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
    aten.scalar_tensor.default, aten.full.default, aten.zeros.default, aten.ones.default,
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.empty.memory_format,
    prims.iota.default,
}

_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}

# reduction op -> (index of dims arg or None for "all dims", index of keepdim arg or None)
_REDUCTIONS = {
    aten.sum.dim_IntList: (1, 2), aten.sum.default: (None, None), aten.mean.dim: (1, 2),
    aten.mean.default: (None, None), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.var.correction: (1, "keepdim"), aten.var_mean.correction: (1, "keepdim"),
    aten.std.correction: (1, "keepdim"), aten.prod.dim_int: (1, 2), aten.prod.default: (None, None),
    aten.any.dim: (1, 2), aten.any.dims: (1, 2), aten.all.dim: (1, 2), aten.argmax.default: (1, 2),
    aten.argmin.default: (1, 2), aten.max.dim: (1, 2), aten.min.dim: (1, 2), aten.logsumexp.default: (1, 2),
    aten.max.default: (None, None), aten.min.default: (None, None), aten.linalg_vector_norm.default: (2, 3),
    prims.sum.default: (1, None), prims.var.default: (1, None),
}

_IGNORE_INDEX = -100  # F.cross_entropy / nll_loss's default ignore_index
_IGNORED_TARGET_MESSAGE = (
    "dpcompile: a target equals ignore_index=-100 in a loss whose default reduction='mean' divides by the number of "
    "targets that are not ignored in the whole batch; that count depends on every sample's label, so the loss is "
    "not a mean of per-sample losses. Write F.cross_entropy(..., reduction='sum') / batch_size, or leave no target "
    "ignored")

# ops that act along one dim (arg index of dim); samples must not be that dim
_ALONG_DIM = {
    aten._softmax.default: 1, aten._log_softmax.default: 1, aten._softmax_backward_data.default: 2,
    aten._log_softmax_backward_data.default: 2, aten.cumsum.default: 1, aten.cumprod.default: 1,
    aten.sort.default: 1, aten.sort.stable: "dim", aten.gather.default: 1, aten.scatter.src: 1,
    aten.scatter.value: 1, aten.scatter_add.default: 1, aten.topk.default: 2, aten.softmax.int: 1,
    aten.log_softmax.int: 1,
}

_SDPA_OPS = {
    name for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
        "_efficient_attention_forward", "_efficient_attention_backward", "_flash_attention_forward",
        "_flash_attention_backward",
    )
}


def _arg(node: fx.Node, idx, default=None):
    if isinstance(idx, str):
        return node.kwargs.get(idx, default)
    if idx < len(node.args):
        return node.args[idx]
    return default


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class BatchDimAnalysis:
    """Run once over a joint graph; `state(node)` answers afterwards."""

    def __init__(self, graph: fx.Graph, seeds: dict, batch_size: sympy.Expr):
        self.graph = graph
        self.B = batch_size
        self.shape_env = graph_shape_env(graph)
        self.states: dict[fx.Node, State] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
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
        if t in _BATCH_FREE_FACTORIES:
            return None
        if t in _IDENTITY_OPS:
            return self.state(node.args[0])
        if t in _VIEW_OPS:
            return self._view(node, node.args[0])
        if t in _REDUCTIONS:
            return self._reduction(node)
        if t in _ALONG_DIM:
            return self._along_dim(node)
        handler = _HANDLERS.get(t)
        if handler is not None:
            return handler(self, node)
        name = _packet_name(t)
        if name in _SDPA_OPS:
            return self._sdpa(node)
        if name in _POOLS and getattr(t, "_overloadname", None) == "default":
            return self._pool(node)
        if _is_pointwise(t):
            return self._pointwise(node)
        return self._unknown(node, "an op the batch-dim analysis does not know, applied to per-sample data")

    # -- rules -----------------------------------------------------------------------------------------------
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

    def _view(self, node: fx.Node, src: fx.Node) -> State:
        s = self.state(src)
        ins, outs = sizes_of(src), sizes_of(node)
        if prod(outs) == 0:
            return None  # an empty tensor holds no sample's data (the loss over T - 1 = 0 shifted targets at T = 1)
        block = s.inner * prod(ins[s.dim + 1:])  # elements per sample block in row-major order
        for e in range(len(outs)):
            after = prod(outs[e + 1:])
            inner = self._quotient(block, after)  # indices of dim e per sample block
            # dim e holds whole rounds of the B blocks (outer of them: T for a time-major flatten)
            if inner is not None and self._quotient(outs[e], inner * self.B) is not None:
                return BDim(e, inner)
        if self._view_at_hints(s, ins, outs):
            return Mixed(node, "a reshape whose sample blocks hold at the traced sizes but cannot be proven for every "
                               "value of the symbolic sizes", unknown=True, symbolic=True)
        return self._mix(node, "a reshape that spreads one sample's block over several dims")

    def _view_at_hints(self, s: BDim, ins, outs) -> bool:
        """The view keeps whole sample blocks in one dim at the sizes the graph was traced with (sizes with
        symbols only): then only the proof for every size failed, not the layout."""
        exprs = [s.inner, self.B, *ins, *outs]
        if self.shape_env is None or not any(sympy.sympify(x).free_symbols for x in exprs):
            return False
        try:
            inner, B = size_hint(s.inner, self.shape_env), size_hint(self.B, self.shape_env)
            ins = [size_hint(x, self.shape_env) for x in ins]
            outs = [size_hint(x, self.shape_env) for x in outs]
        except Exception:  # noqa: BLE001 (a size without a hint)
            return False
        block = inner * math.prod(ins[s.dim + 1:])
        for e in range(len(outs)):
            after = math.prod(outs[e + 1:])
            if after and block % after == 0 and outs[e] % (block // after * B) == 0:
                return True
        return False

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

    def _reduction(self, node: fx.Node) -> State:
        dims_idx, keep_idx = _REDUCTIONS[node.target]
        s = self.state(node.args[0])
        rank = rank_of(node.args[0])
        dims = None if dims_idx is None else _arg(node, dims_idx)
        if dims is None or dims == []:
            dims = list(range(rank))
        elif isinstance(dims, int):
            dims = [dims]
        dims = [_norm_dim(d, rank) for d in dims]
        if s.dim in dims:
            if self._is_target_count(node, dims):
                return self._checked_count(node)
            return self._mix(node, "a reduction over the batch dim")
        keep = bool(_arg(node, keep_idx, False)) if keep_idx is not None else False
        new = BDim(s.dim if keep else s.dim - sum(d < s.dim for d in dims), s.inner)
        if node.target in (aten.var_mean.correction, aten.max.dim, aten.min.dim):
            return (new, new)
        return new

    def _is_target_count(self, node: fx.Node, dims) -> bool:
        """sum(y != -100) over a 1-D integer target tensor with k targets per sample (BDim(0, k): one per sample,
        or a (B, T) tensor flattened): the count by which F.cross_entropy / nll_loss's default mean divides
        (ignore_index=-100)."""
        if node.target not in (aten.sum.default, aten.sum.dim_IntList) or _arg(node, 3) is not None \
                or node.kwargs.get("dtype") is not None:
            return False
        x = node.args[0]
        if not (isinstance(x, fx.Node) and x.target is aten.ne.Scalar and x.args[1] == _IGNORE_INDEX):
            return False
        y = x.args[0]
        val = y.meta.get("val") if isinstance(y, fx.Node) else None
        return isinstance(val, torch.Tensor) and val.dim() == 1 and not val.is_floating_point() \
            and not val.is_complex() and val.dtype is not torch.bool and isinstance(self.state(y), BDim) \
            and self.state(y).dim == 0 and dims == [0]

    def _checked_count(self, node: fx.Node) -> State:
        """The count of targets != -100 equals the number of targets (B*k) exactly when no target is ignored: a
        check that it does is added to the graph (once), right after the count, and the count is then batch-free
        (it is B*k; meta "dpcompile_checked_count" holds k, which the loss-reduction check reads). A batch with an
        ignored target stops at that check: the loss would divide by a count over every sample's label, which
        mixes samples."""
        if "dpcompile_checked_count" not in node.meta:
            from torch._guards import detect_fake_mode

            y = node.args[0].args[0]
            count = node.meta["val"]
            fake_mode = detect_fake_mode([count])
            graph = self.graph
            with graph.inserting_after(node):
                size = graph.call_function(aten.sym_size.int, (y, 0))
            size.meta["val"] = y.meta["val"].shape[0]
            with graph.inserting_after(size):
                same = graph.call_function(aten.eq.Scalar, (node, size))
            with fake_mode:
                same.meta["val"] = aten.eq.Scalar(count, size.meta["val"])
            with graph.inserting_after(same):
                graph.call_function(aten._assert_async.msg, (same, _IGNORED_TARGET_MESSAGE))
            node.meta["dpcompile_checked_count"] = self.state(y).inner
            for n in (size, same):
                self.states[n] = None
        return None

    def _along_dim(self, node: fx.Node) -> State:
        idx = _ALONG_DIM[node.target]
        out_rank = rank_of(node) if rank_of(node) is not None else rank_of(node.args[0])
        d = _norm_dim(_arg(node, idx, -1), out_rank)  # sort / topk default to the last dim
        operands = [a for a in _flatten_nodes((node.args, node.kwargs)) if rank_of(a) == out_rank]
        for a in operands:
            s = self.state(a)
            if isinstance(s, BDim) and s.dim == d:
                return self._mix(node, "an op acting along the batch dim")
        if any(rank_of(a) not in (None, out_rank) and isinstance(self.state(a), BDim)
               for a in _flatten_nodes((node.args, node.kwargs))):
            return self._unknown(node, "an op along a dim with operands of different ranks")
        r = self._pointwise(node, operands, out_rank)
        if isinstance(node.meta.get("val"), (tuple, list)):  # sort / topk: (values, indices)
            return (r, r)
        return r

    def _permute(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        rank = rank_of(node.args[0])
        perm = [_norm_dim(p, rank) for p in node.args[1]]
        return BDim(perm.index(s.dim), s.inner)

    def _transpose(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        rank = rank_of(node.args[0])
        if node.target is aten.t.default:
            a, b = 0, rank - 1 if rank > 1 else 0
        else:
            a, b = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
        d = b if s.dim == a else a if s.dim == b else s.dim
        return BDim(d, s.inner)

    def _unsqueeze(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        d = _norm_dim(node.args[1], rank_of(node))
        return BDim(s.dim + (1 if d <= s.dim else 0), s.inner)

    def _squeeze(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        rank = rank_of(node.args[0])
        ins = sizes_of(node.args[0])
        if node.target is aten.squeeze.default:
            dims = [i for i in range(rank) if ins[i] == 1]
        else:
            arg = node.args[1]
            dims = [_norm_dim(d, rank) for d in (arg if isinstance(arg, (list, tuple)) else [arg])]
            dims = [d for d in dims if ins[d] == 1]
        if s.dim in dims:  # only possible when B == 1: the sample dim disappears; keep it as a view would
            return self._view(node, node.args[0])
        return BDim(s.dim - sum(d < s.dim for d in dims), s.inner)

    def _expand(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        return BDim(s.dim + rank_of(node) - rank_of(node.args[0]), s.inner)

    def _slice_like(self, node: fx.Node) -> State:
        # slice / narrow / select / split along a dim: fine unless that dim carries samples
        s = self.state(node.args[0])
        rank = rank_of(node.args[0])
        t = node.target
        d = _norm_dim(_arg(node, _SPLIT_DIM_ARG.get(t, 1), node.kwargs.get("dim", 0)), rank)
        if d == s.dim:
            if t is aten.slice.Tensor and statically_equal(sizes_of(node)[d], sizes_of(node.args[0])[d],
                                                           self.shape_env):
                return s  # a full slice
            return self._mix(node, "an op that takes part of the batch dim")
        if t is aten.select.int:
            return BDim(s.dim - (1 if d < s.dim else 0), s.inner)
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default):
            n = len(node.meta["val"])
            new = BDim(s.dim - (1 if t is aten.unbind.int and d < s.dim else 0), s.inner)
            return tuple(new for _ in range(n))
        return s

    def _cat(self, node: fx.Node) -> State:
        tensors = node.args[0]
        rank = rank_of(node)
        d = _norm_dim(_arg(node, 1, 0), rank)
        found = self._pointwise(node, [a for a in tensors if rank_of(a) == rank])
        if isinstance(found, BDim) and found.dim == d:
            if self._whole_rounds(tensors, found, d):
                return found
            return self._mix(node, "a concatenation along the batch dim")
        return found

    def _whole_rounds(self, tensors, s: BDim, d: int) -> bool:
        """A concatenation along the batch dim of operands that each hold whole rounds of the B sample blocks
        (every operand per-sample with the same layout, its size a multiple of inner * B): each operand starts at
        a multiple of inner * B, so index i still belongs to sample (i // inner) % B (torch.stack of per-sample
        tensors along a dim before the batch dim is decomposed into this cat and a view)."""
        for a in tensors:
            sizes = sizes_of(a)
            if sizes is None or len(sizes) != rank_of(tensors[0]) or self.state(a) != s:
                return False
            if self._quotient(sizes[d], s.inner * self.B) is None:
                return False
        return True

    def _stack(self, node: fx.Node) -> State:
        tensors = node.args[0]
        d = _norm_dim(_arg(node, 1, 0), rank_of(node))
        found = self._pointwise(node, list(tensors), rank_of(tensors[0]))
        if isinstance(found, BDim):
            return BDim(found.dim + (1 if d <= found.dim else 0), found.inner)
        return found

    def _mm(self, node: fx.Node) -> State:
        if node.target is aten.addmm.default:
            bias, a, b = node.args[:3]
        else:
            bias, (a, b) = None, node.args[:2]
        sa, sb = self.state(a), self.state(b)
        if isinstance(sa, BDim) and sa.dim == 1 or isinstance(sb, BDim) and sb.dim == 0:
            return self._mix(node, "a matmul contracting the batch dim")
        if isinstance(sa, BDim) and isinstance(sb, BDim):
            return self._mix(node, "a matmul pairing rows of one sample with columns of another")
        out = BDim(0, sa.inner) if isinstance(sa, BDim) else BDim(1, sb.inner) if isinstance(sb, BDim) else None
        sbias = self.state(bias) if bias is not None else None
        if isinstance(sbias, BDim):
            aligned = BDim(sbias.dim + 2 - rank_of(bias), sbias.inner)
            if out is not None and out != aligned:
                return self._mix(node, "addmm combines different samples")
            out = aligned
        return out

    def _baddbmm(self, node: fx.Node) -> State:
        """baddbmm(input, b1, b2): beta * input + alpha * bmm(b1, b2), input broadcast to the product's shape."""
        prod_state = self._bmm(node, node.args[1:3])
        if isinstance(prod_state, Mixed):
            return prod_state
        operands = [node.args[0]]
        found = self._pointwise(node, operands, 3)
        if isinstance(found, BDim) and isinstance(prod_state, BDim) and found != prod_state:
            return self._mix(node, "baddbmm adds values of different samples")
        return prod_state if isinstance(prod_state, BDim) else found

    def _bmm(self, node: fx.Node, operands=None) -> State:
        a, b = operands if operands is not None else node.args[:2]
        sa, sb = self.state(a), self.state(b)
        if isinstance(sa, BDim) and sa.dim == 2 or isinstance(sb, BDim) and sb.dim == 1:
            return self._mix(node, "a batched matmul contracting the batch dim")
        outs = []
        if isinstance(sa, BDim):
            outs.append(BDim(sa.dim, sa.inner))
        if isinstance(sb, BDim):
            outs.append(BDim(0 if sb.dim == 0 else 2, sb.inner))
        if len(outs) == 2 and (outs[0] != outs[1] or outs[0].dim != 0):
            return self._mix(node, "a batched matmul pairing different samples")
        return outs[0] if outs else None

    def _embedding(self, node: fx.Node) -> State:
        weight, idx = node.args[:2]
        if isinstance(self.state(weight), BDim):
            return self._unknown(node, "an embedding whose table carries samples")
        s = self.state(idx)
        return BDim(s.dim, s.inner) if isinstance(s, BDim) else None

    def _index_select(self, node: fx.Node) -> State:
        x, d, idx = node.args[:3]
        s = self.state(x)
        if isinstance(self.state(idx), BDim):
            return self._unknown(node, "index_select with per-sample indices")
        if _norm_dim(d, rank_of(x)) == s.dim:
            return self._mix(node, "index_select along the batch dim")
        return s

    def _index(self, node: fx.Node) -> State:
        x, indices = node.args[:2]
        sx = self.state(x)
        present = [i for i, ix in enumerate(indices) if ix is not None]
        idx_states = [self.state(indices[i]) for i in present]
        if not present or present != list(range(present[0], present[-1] + 1)):
            return self._unknown(node, "advanced indexing with non-adjacent indices")
        idx_rank = max(rank_of(indices[i]) for i in present)
        p0, pk = present[0], present[-1]
        if isinstance(sx, BDim):
            if p0 <= sx.dim <= pk:
                if any(isinstance(s, BDim) for s in idx_states):
                    return self._unknown(node, "gathering along the batch dim")
                return self._mix(node, "indexing into the batch dim")
            if any(isinstance(s, BDim) for s in idx_states):
                return self._unknown(node, "indexing per-sample data with per-sample indices")
            return BDim(sx.dim if sx.dim < p0 else sx.dim - len(present) + idx_rank, sx.inner)
        found = None
        for i, s in zip(present, idx_states):
            if isinstance(s, BDim):
                aligned = BDim(p0 + s.dim + idx_rank - rank_of(indices[i]), s.inner)
                if found is not None and found != aligned:
                    return self._mix(node, "indices from different samples combined")
                found = aligned
        return found

    def _layer_norm(self, node: fx.Node) -> State:
        x, shape = node.args[:2]
        s = self.state(x)
        for w in node.args[2:4]:
            if isinstance(self.state(w), BDim):
                return self._unknown(node, "layer_norm with per-sample affine parameters")
        if s.dim >= rank_of(x) - len(shape):
            return self._mix(node, "a layer_norm normalising over the batch dim")
        return (s, s, s)

    def _sdpa(self, node: fx.Node) -> State:
        found = None
        for a in _flatten_nodes((node.args, node.kwargs)):
            s = self.state(a)
            if isinstance(s, BDim):
                if s.dim not in (0, 1) or (found is not None and found != s):
                    return self._mix(node, "attention across samples")
                found = s
        vals = node.meta.get("val")
        if isinstance(vals, (tuple, list)):
            return tuple(found if isinstance(v, torch.Tensor) and v.dim() >= 3 else None for v in vals)
        return found

    def _scatter_into(self, node: fx.Node) -> State:
        # select_scatter / slice_scatter(base, src, dim, ...): the backward of select / slice
        base, src, d = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else 0
        rank = rank_of(base)
        d = _norm_dim(d, rank)
        sb, ss = self.state(base), self.state(src)
        if isinstance(ss, BDim) and node.target is aten.select_scatter.default:
            ss = BDim(ss.dim + (1 if ss.dim >= d else 0), ss.inner)
        full = node.target is aten.slice_scatter.default and statically_equal(sizes_of(base)[d], sizes_of(src)[d],
                                                                              self.shape_env) \
            and (len(node.args) < 6 or node.args[5] == 1)
        if full:
            return ss  # the source covers the whole base: a copy
        found = None
        for s in (sb, ss):
            if isinstance(s, BDim):
                if s.dim == d or (found is not None and found != s):
                    return self._mix(node, "a scatter along the batch dim")
                found = s
        return found

    def _pad(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        pad = node.args[1]
        rank = rank_of(node.args[0])
        padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
        if s.dim in padded:
            return self._mix(node, "padding along the batch dim")
        return s

    def _last_two_dims(self, node: fx.Node) -> State:
        # tril / triu act on the last two dims
        s = self.state(node.args[0])
        if s.dim >= rank_of(node.args[0]) - 2:
            return self._mix(node, "a triangular mask over the batch dim")
        return s

    def _repeat_interleave(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if d is None or _norm_dim(d, rank_of(node.args[0])) == s.dim:
            return self._mix(node, "repeat_interleave over the batch dim")
        return s

    def _embedding_backward(self, node: fx.Node) -> State:
        grad, idx = node.args[:2]
        if isinstance(self.state(idx), BDim) or isinstance(self.state(grad), BDim):
            return self._mix(node, "an embedding gradient summed over the batch")
        return None

    def _index_put(self, node: fx.Node) -> State:
        # scatter(-accumulate) of values into base at index positions. With per-sample indices, or the batch dim
        # among the indexed dims, samples are summed together (an embedding gradient: a site, or a mix). With
        # batch-free indices on other dims (backward of x[..., idx] / index_select) samples stay apart.
        if node.target is aten._unsafe_masked_index_put_accumulate.default:
            base, mask, indices, values = node.args[:4]
        else:
            base, indices, values = node.args[:3]
            mask = None
        present = [i for i, ix in enumerate(indices) if ix is not None]
        if any(isinstance(self.state(indices[i]), BDim) for i in present) or not present:
            return self._mix(node, "a scatter-accumulate over the batch")
        if present != list(range(present[0], present[-1] + 1)):
            return self._unknown(node, "index_put with non-adjacent indices")
        p0 = present[0]
        idx_rank = max(rank_of(indices[i]) for i in present)
        found = None
        sv = self.state(values)
        if isinstance(sv, BDim):
            full_rank = rank_of(base) - len(present) + idx_rank  # values broadcast to base[:p0] + idx + rest
            v = sv.dim + full_rank - rank_of(values)
            if p0 <= v < p0 + idx_rank:
                return self._mix(node, "a scatter along the batch dim")
            found = BDim(v if v < p0 else v - idx_rank + len(present), sv.inner)
        sb = self.state(base)
        if isinstance(sb, BDim):
            if sb.dim in present or (found is not None and found != sb):
                return self._mix(node, "a scatter along the batch dim")
            found = sb
        if mask is not None and isinstance(self.state(mask), BDim) and found is None:
            return self._unknown(node, "a masked scatter with per-sample mask only")
        return found

    def _convolution(self, node: fx.Node) -> State:
        # convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        x, w = node.args[:2]
        s = self.state(x)
        if isinstance(self.state(w), BDim) or not isinstance(s, BDim) or s.dim != 0 or s.inner != 1:
            return self._unknown(node, "a convolution whose samples are not dim 0 of its input")
        return BDim(0)

    def _convolution_backward(self, node: fx.Node) -> State:
        # (grad_input, grad_weight, grad_bias): the weight and bias gradients sum over samples
        grad, x, w = node.args[:3]
        for a in (grad, x):
            s = self.state(a)
            if s is not None and (not isinstance(s, BDim) or s.dim != 0 or s.inner != 1):
                return self._unknown(node, "a convolution backward whose samples are not dim 0")
        if isinstance(self.state(w), BDim):
            return self._unknown(node, "a convolution with per-sample weights")
        summed = self._mix(node, "a convolution weight gradient summed over the batch")
        return (BDim(0), summed, summed)

    def _as_strided(self, node: fx.Node) -> State:
        """as_strided(x, size, stride, offset) that reads x's elements in row-major order (contiguous x at offset 0,
        contiguous strides of `size`, as many elements): the same as x.view(size) (GroupNorm's decomposition).
        Any other as_strided may read one sample's memory at another's position: unknown."""
        x, size, stride = node.args[:3]
        offset = _arg(node, 3, None)
        xv, out = x.meta.get("val"), node.meta.get("val")
        env = self.shape_env
        if isinstance(xv, torch.Tensor) and isinstance(out, torch.Tensor) and offset in (None, 0) \
                and contiguous_strides(xv.shape, xv.stride(), env) and statically_equal(
                    sym_expr(xv.storage_offset()), 0, env) \
                and contiguous_strides(out.shape, list(stride), env) \
                and statically_equal(prod(sizes_of(x)), prod(sizes_of(node)), env):
            return self._view(node, x)
        return self._unknown(node, "an as_strided that is not a plain reshape of a contiguous tensor")

    def _pool(self, node: fx.Node) -> State:
        """Pooling and its backward act on each plane of the last len(kernel_size) (spatial) dims on its own (max
        pool indices are offsets within a plane): samples must sit on a leading dim, the same one in every operand."""
        n_spatial = _POOLS[_packet_name(node.target)]
        if n_spatial is None:
            n_spatial = len(_arg(node, 1))
        out_rank = rank_of(node.args[0])
        operands = [a for a in _flatten_nodes((node.args, node.kwargs)) if isinstance(self.state(a), BDim)]
        for a in operands:
            if rank_of(a) != out_rank or self.state(a).dim >= out_rank - n_spatial:
                return self._unknown(node, "a pooling whose samples are not on a leading dim")
        found = self._pointwise(node, operands, out_rank)
        if isinstance(node.meta.get("val"), (tuple, list)):
            return tuple(found for _ in node.meta["val"])
        return found

    def _embedding_bag(self, node: fx.Node) -> State:
        """_embedding_bag(weight, indices, offsets, ...) with one bag per sample: 1-D indices holding L per sample
        (BDim(0, L): a (B, L) input flattened) and offsets = iota(B, start=0, step=L), which nn.EmbeddingBag builds
        for a 2-D input. Bag b is then exactly sample b's L indices. Any other offsets (a user's 1-D input with its
        own offsets) may put several samples in one bag: unknown."""
        weight, idx, offsets = node.args[:3]
        include_last = _arg(node, 7, False)
        si, psw = self.state(idx), _arg(node, 6)
        if self.state(weight) is not None or self.state(offsets) is not None or include_last \
                or not isinstance(si, BDim) or si.dim != 0 or rank_of(idx) != 1:
            return self._unknown(node, "an embedding bag whose bags are not one per sample")
        if psw is not None and self.state(psw) not in (None, si):
            return self._unknown(node, "an embedding bag with per-sample weights laid out unlike its indices")
        if not self._bags_are_samples(idx, offsets):
            return self._unknown(node, "an embedding bag whose bags are not one per sample (its offsets are not those "
                                              "nn.EmbeddingBag builds for a 2-D input, one bag of L ids per sample)")
        env, bags, n_idx = self.shape_env, sizes_of(offsets)[0], sizes_of(idx)[0]
        outs = []
        for v in node.meta["val"]:
            if v.dim() == 0:
                return self._unknown(node, "an embedding bag output of an unexpected size")
            size = sym_expr(v.shape[0])
            if size == 0:
                outs.append(None)  # an output this mode does not fill
            elif statically_equal(size, bags, env):
                outs.append(BDim(0))
            elif statically_equal(size, n_idx, env):
                outs.append(BDim(0, si.inner))
            else:
                return self._unknown(node, "an embedding bag output of an unexpected size")
        return tuple(outs)

    def _bags_are_samples(self, idx, offsets) -> bool:
        """Bag b holds exactly sample b's indices: 1-D indices BDim(0, L) of B*L elements, offsets a batch-free
        iota(B, start=0, step=L)."""
        si, env = self.state(idx), self.shape_env
        if not isinstance(si, BDim) or si.dim != 0 or rank_of(idx) != 1 or self.state(offsets) is not None:
            return False
        if not (isinstance(offsets, fx.Node) and offsets.target is prims.iota.default
                and offsets.kwargs.get("start", None) == 0 and isinstance(offsets.kwargs.get("step"), (int, fx.Node))):
            return False
        step = offsets.kwargs["step"]
        step = sym_expr(step.meta["val"]) if isinstance(step, fx.Node) else sympy.Integer(step)
        return statically_equal(step, si.inner, env) and statically_equal(sizes_of(idx)[0], self.B * si.inner, env) \
            and self._is_batch_count(sizes_of(offsets)[0])

    def _embedding_bag_backward(self, node: fx.Node) -> State:
        """The weight gradient of an embedding bag sums over bags: over samples where bags are samples (a site,
        sites/embedding_bag.py), else unknown."""
        grad, idx = node.args[:2]
        if node.target is aten._embedding_bag_backward.default and self._bags_are_samples(idx, node.args[2]) \
                and self.state(grad) == BDim(0):
            return self._mix(node, "an embedding-bag gradient summed over the batch")
        return self._unknown(node, "an embedding-bag gradient whose bags are not one per sample")

    def _is_batch_count(self, size) -> bool:
        """size == B for every size: also as ceil(B*L / L) = FloorDiv(B*L + L - 1, L), L >= 1 (arange's length)."""
        from torch.utils._sympy.functions import FloorDiv

        if statically_equal(size, self.B, self.shape_env):
            return True
        if isinstance(size, FloorDiv):
            num, den = size.args
            rest = sympy.expand(num - self.B * den)
            return (rest == 0 or sympy.expand(rest - den + 1) == 0) and _provably_positive(den, self.shape_env)
        return False

    def _copy(self, node: fx.Node) -> State:
        """copy(self, src): src's values broadcast to self's shape (and dtype); self gives only the shape."""
        return self._pointwise(node, [node.args[1]])

    def _repeat(self, node: fx.Node) -> State:
        """x.repeat(*r): new leading dims, and each dim tiled r[i] times. A tiled batch dim holds whole rounds of
        the B sample blocks (its size is a multiple of inner * B), so every tile keeps the same sample order."""
        s = self.state(node.args[0])
        d = s.dim + len(node.args[1]) - rank_of(node.args[0])
        if node.args[1][d] != 1 and self._quotient(sizes_of(node.args[0])[s.dim], s.inner * self.B) is None:
            return self._unknown(node, "repeat of a batch dim that does not hold whole rounds of the samples")
        return BDim(d, s.inner)

    def _view_as_complex(self, node: fx.Node) -> State:
        """(..., 2) real -> (...) complex: the last dim (the pair) disappears."""
        s = self.state(node.args[0])
        if s.dim == rank_of(node.args[0]) - 1:
            return self._mix(node, "view_as_complex pairs values along the batch dim")
        return s

    def _same_dims(self, node: fx.Node) -> State:
        """view_as_real ((...) complex -> (..., 2): a dim added last), real / imag, conj: the dims are kept."""
        return self.state(node.args[0])

    def _flip(self, node: fx.Node) -> State:
        s = self.state(node.args[0])
        dims = [_norm_dim(d, rank_of(node.args[0])) for d in node.args[1]]
        if s.dim in dims:
            return self._mix(node, "reversing the batch dim")
        return s


# pooling ops and their backwards, by overload packet name (Inductor's prims are registered only once Inductor is
# imported) -> the number of spatial dims (None: the length of the kernel_size argument, args[1])
# split / chunk take their sizes (or count) first and the dim second; slice, narrow, select, unbind the dim first
_SPLIT_DIM_ARG = {aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2}

_POOLS = {
    "_low_memory_max_pool_with_offsets": None, "_low_memory_max_pool_offsets_to_indices": None,
    **{f"{name}{d}d{suffix}": d for d in (1, 2, 3) for name, suffix in (
        ("max_pool", "_with_indices"), ("max_pool", "_with_indices_backward"), ("avg_pool", ""),
        ("avg_pool", "_backward"), ("_adaptive_avg_pool", ""), ("_adaptive_avg_pool", "_backward"),
        ("adaptive_max_pool", ""), ("adaptive_max_pool", "_backward"))},
}


def _packet_name(target) -> str:
    return getattr(getattr(target, "_overloadpacket", None), "__name__", "")


def _flatten_nodes(x) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(x, lambda n: out.append(n) or n)
    return out


def _flatten_states(s):
    if isinstance(s, tuple):
        for x in s:
            yield from _flatten_states(x)
    else:
        yield s


_HANDLERS = {
    aten.permute.default: BatchDimAnalysis._permute,
    aten.t.default: BatchDimAnalysis._transpose,
    aten.transpose.int: BatchDimAnalysis._transpose,
    aten.unsqueeze.default: BatchDimAnalysis._unsqueeze,
    aten.squeeze.dim: BatchDimAnalysis._squeeze,
    aten.squeeze.dims: BatchDimAnalysis._squeeze,
    aten.squeeze.default: BatchDimAnalysis._squeeze,
    aten.expand.default: BatchDimAnalysis._expand,
    aten.slice.Tensor: BatchDimAnalysis._slice_like,
    aten.narrow.default: BatchDimAnalysis._slice_like,
    aten.select.int: BatchDimAnalysis._slice_like,
    aten.split.Tensor: BatchDimAnalysis._slice_like,
    aten.split_with_sizes.default: BatchDimAnalysis._slice_like,
    aten.unbind.int: BatchDimAnalysis._slice_like,
    aten.chunk.default: BatchDimAnalysis._slice_like,
    aten.cat.default: BatchDimAnalysis._cat,
    aten.stack.default: BatchDimAnalysis._stack,
    aten.mm.default: BatchDimAnalysis._mm,
    aten.addmm.default: BatchDimAnalysis._mm,
    aten.bmm.default: BatchDimAnalysis._bmm,
    aten.baddbmm.default: BatchDimAnalysis._baddbmm,
    aten.embedding.default: BatchDimAnalysis._embedding,
    aten.index_select.default: BatchDimAnalysis._index_select,
    aten.index.Tensor: BatchDimAnalysis._index,
    aten._unsafe_index.Tensor: BatchDimAnalysis._index,
    aten.native_layer_norm.default: BatchDimAnalysis._layer_norm,
    aten.embedding_dense_backward.default: BatchDimAnalysis._embedding_backward,
    aten.select_scatter.default: BatchDimAnalysis._scatter_into,
    aten.slice_scatter.default: BatchDimAnalysis._scatter_into,
    aten.constant_pad_nd.default: BatchDimAnalysis._pad,
    aten.tril.default: BatchDimAnalysis._last_two_dims,
    aten.triu.default: BatchDimAnalysis._last_two_dims,
    aten.repeat_interleave.self_int: BatchDimAnalysis._repeat_interleave,
    aten.flip.default: BatchDimAnalysis._flip,
    aten.repeat.default: BatchDimAnalysis._repeat,
    aten.view_as_complex.default: BatchDimAnalysis._view_as_complex,
    aten.view_as_real.default: BatchDimAnalysis._same_dims,
    aten.real.default: BatchDimAnalysis._same_dims,
    aten.imag.default: BatchDimAnalysis._same_dims,
    aten._conj.default: BatchDimAnalysis._same_dims,
    aten.resolve_conj.default: BatchDimAnalysis._same_dims,
    aten.resolve_neg.default: BatchDimAnalysis._same_dims,
    aten.polar.default: BatchDimAnalysis._pointwise,
    aten.complex.default: BatchDimAnalysis._pointwise,
    aten.as_strided.default: BatchDimAnalysis._as_strided,
    aten.copy.default: BatchDimAnalysis._copy,
    aten._embedding_bag.default: BatchDimAnalysis._embedding_bag,
    aten._embedding_bag_forward_only.default: BatchDimAnalysis._embedding_bag,
    aten._embedding_bag_backward.default: BatchDimAnalysis._embedding_bag_backward,
    aten.convolution.default: BatchDimAnalysis._convolution,
    aten.convolution_backward.default: BatchDimAnalysis._convolution_backward,
    prims.rev.default: BatchDimAnalysis._flip,
    aten.index_put.default: BatchDimAnalysis._index_put,
    aten._unsafe_index_put.default: BatchDimAnalysis._index_put,
    aten.index_put_.default: BatchDimAnalysis._index_put,
    aten._unsafe_masked_index_put_accumulate.default: BatchDimAnalysis._index_put,
}
