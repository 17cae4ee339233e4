"""Replace each clipping group's parameter gradients by: per-site norm ops -> clip factors -> clipped sums.

The replacement for a group is written as a Python function of existing graph values, traced with make_fx
(Inductor's decomposition table, the graph's fake mode) and copied into the joint graph right after the last
value it reads, so that per-layer groups stream through the backward and flat groups wait for every norm.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
from torch.fx.experimental.proxy_tensor import make_fx

from ..codegen import ops
from ..codegen.registry import inlined_ops
from ..errors import UnsupportedGradientError
from ..strategy_registry import find_strategy, get_strategy
from ..clipping import group_clip_factors
from .chain import _arg, replay, replay_per_sample
from .discover import Contribution, ParamGrad
from .patterns import contribution_reads
from .sites import site_kind
from .trace_cache import GroupTraceCache, canonical, traced_for

log = logging.getLogger("dpcompile")

aten = torch.ops.aten

def _site_clipped_sum(site, ins, coef, strategy: str):
    return site_kind(site.kind).clipped_sum(site, ins, coef, strategy)


def per_sample_grad(pg: ParamGrad, env: dict, bsz) -> torch.Tensor:
    """(B, *param.shape): the sum of all contributions of one parameter, per sample."""
    total = None
    for c in pg.contributions:
        ps = c.site.per_sample(env, bsz)
        for step in c.chain:
            ps = replay_per_sample(step, ps, env)
        ps = -ps if c.negate else ps
        ps = ps.reshape(ps.shape[0], *pg.grad.meta["val"].shape)
        total = ps if total is None else total + ps
    return total


# ----------------------------------------------------------------------------------------------------------
# the group replacement


def group_inputs(params: list, batch_node: fx.Node) -> list[fx.Node]:
    """Every existing graph value the group's replacement reads, in graph order."""
    seen: dict[fx.Node, None] = {batch_node: None}
    for pg in params:
        for c in pg.contributions:
            seen.update(dict.fromkeys(n for n in contribution_reads(c) if n not in seen))
    return list(seen)


@dataclass
class RandomizedNorms:
    """The randomized sites of one graph (docs/randomized.md): one probe seed per graph call (`seed`, the input the
    backend appends), k probes of `variant`, and a site id per randomized parameter, distinct in the graph.
    `products`: batch-size-1 graphs only, pg -> (the weight-gradient mm node, the chain's scale), whose value is
    the one sample's product s_0 = a_0^T b_0."""

    probes: int
    variant: str
    seed: fx.Node
    site_ids: dict  # pg -> site id
    products: dict = field(default_factory=dict)

    def norm(self, pg, a, b, env: dict):
        seed = env[self.seed]
        return torch.ops.dpcompile.linear_norm_randomized(a, b, self.probes, self.variant, seed, self.site_ids[pg])

    def estimate(self, pg, s, env: dict):
        """The estimate for per-sample products s (B, M, N) that are formed: the site's law and probes."""
        return torch.ops.dpcompile.persample_norm_randomized(s, self.probes, self.variant, env[self.seed],
                                                             self.site_ids[pg])

    def product_norm(self, pg, env: dict):
        node, scale = self.products[pg]
        n2 = self.estimate(pg, env[node].unsqueeze(0), env)  # (1, M, N): the sample's product, as the mm formed it
        return n2 * (scale * scale) if scale != 1.0 else n2


def _fused_norm(pg: ParamGrad, strategy: str, env: dict, bsz, randomized: Optional[RandomizedNorms] = None):
    """(squared norms with the contribution's scale, what the clipped sum needs) of one fused parameter."""
    c: Contribution = pg.contributions[0]
    kind = site_kind(c.site.kind)
    # the kind's norm op (for linear sites, the strategy's); what its clipped sum reads (e.g. kept products)
    n2, ins = kind.norm(c.site, kind.fused_inputs(c.site, env, bsz), strategy, pg, env, randomized)
    if c.scale != 1.0:
        n2 = n2 * (c.scale * c.scale)
    return n2, ins


def _finish_fused(pg: ParamGrad, s, env: dict):
    c = pg.contributions[0]
    for step in c.chain:
        s = replay(step, s, env)
    return -s if c.negate else s


def _as_grad(pg: ParamGrad, s):
    """A clipped sum typed and shaped like the parameter's gradient output."""
    val = pg.grad.meta["val"]
    return s.to(val.dtype).reshape(val.shape)


@dataclass(frozen=True)
class RuntimeThreshold:
    """A group's threshold read at run time (max_grad_norm="adaptive"): entry `index` of the (G,) thresholds
    placeholder `node` (which must be among the group function's inputs)."""

    node: fx.Node
    index: int

    def value(self, env: dict):
        return env[self.node][self.index]


def quantile_count(sq_norms: torch.Tensor, threshold, mean: bool, batch) -> torch.Tensor:
    """sum_i (1[||g_i|| <= C] - 1/2) in float64, from a group's squared norms of the gradients of the loss as
    written (under "mean" they carry 1/B, undone as in group_clip_factors): the count the adaptive-clipping quantile
    estimate needs, centred so that adding or removing one sample changes it by 1/2 (privacy/adaptive.py)."""
    if mean:
        sq_norms = sq_norms * (batch * batch)
    inside = sq_norms.clamp_min(0).sqrt().to(torch.float64) <= threshold
    return (inside.to(torch.float64) - 0.5).sum()


def norm_rows_of(pg: ParamGrad, strategy: str) -> Optional[Callable]:
    """The strategy's norm_rows (the squared norms as (B, K) parts) for a fused parameter whose strategy has one."""
    record = find_strategy(strategy) if pg.fused else None
    return record.norm_rows if record is not None else None


def param_norm_rows(pg: ParamGrad, strategy: str, env: dict, bsz):
    """(the parameter's per-sample squared norms as (B, K) parts, what its clipped sum reads)."""
    c = pg.contributions[0]
    parts, prepared = norm_rows_of(pg, strategy)(site_kind(c.site.kind).fused_inputs(c.site, env, bsz), pg, env)
    return (parts * (c.scale * c.scale) if c.scale != 1.0 else parts), prepared


def param_norm(pg: ParamGrad, strategy: str, env: dict, bsz, randomized: Optional[RandomizedNorms] = None):
    """(the parameter's per-sample squared norms (B,), what its clipped sum reads)."""
    if pg.fused:
        return _fused_norm(pg, strategy, env, bsz, randomized)
    if randomized is not None and pg in randomized.products:
        return randomized.product_norm(pg, env), per_sample_grad(pg, env, bsz)
    return get_strategy("materialize").norm(per_sample_grad(pg, env, bsz), pg, env, randomized)


def param_clipped_sum(pg: ParamGrad, prepared, coef, strategy: str, env: dict) -> torch.Tensor:
    """sum_i coef_i g_i of one parameter, shaped and typed like its gradient."""
    if pg.fused:
        s = _finish_fused(pg, _site_clipped_sum(pg.contributions[0].site, prepared, coef, strategy), env)
    else:
        s = get_strategy("materialize").clipped_sum(prepared, coef)
    return _as_grad(pg, s)


def group_clip_param(params: list, strategies: dict) -> Optional[ParamGrad]:
    """The parameter whose strategy forms the group's clip factor itself (at most one per group), if any."""
    return next((pg for pg in params if (st := find_strategy(strategies.get(pg, ""))) and st.group_clip), None)


def rows_group_sites(params: list) -> list:
    """The parameters of a group that are one fused site each of a kind with column sums (biases, norm weights:
    SiteKind.column_sums), with unit scale: what codegen.ops.rows_group_clipped_sum takes."""
    return [pg for pg in params if pg.fused and site_kind(pg.contributions[0].site.kind).column_sums is not None
            and pg.contributions[0].scale == 1.0]


def make_group_fn(params: list, inputs: list, batch_node: fx.Node, batch_dim: int, threshold,
                  clip_fn: str, mean: bool, strategies: dict | None = None, budget_bytes: int = 0,
                  randomized: Optional[RandomizedNorms] = None) -> Callable:
    """threshold: C_g (a number), or a RuntimeThreshold: then the function returns, after the clipped sums, the
    group's quantile_count (a 0-dim float64 tensor).
    randomized: the graph's randomized sites (its seed node must be among `inputs` when a param of this group
    is randomized: strategy "randomized", or, in a batch-size-1 graph, an entry of randomized.products)."""
    strategies = dict(strategies or {})
    single = group_clip_param(params, strategies)
    runtime = isinstance(threshold, RuntimeThreshold)
    if runtime and single is not None:  # the planner never gives one (Strategy.runtime_threshold)
        raise UnsupportedGradientError(f"strategy {strategies[single]!r} forms the group's clip factor itself, "
                                       f"which run-time thresholds do not support (parameter `{single.name}`)")

    # the group's rows sites whose norms, factor and sums one op forms (at most two: its kernel's pointers); a
    # single-pass site then runs as its factor_apart form (the same products and traffic, the factor apart)
    rows_together = [] if runtime else rows_group_sites(params)[:2]
    if single is not None and rows_together:
        apart = get_strategy(strategies[single]).factor_apart
        if apart is None:
            rows_together = []
        else:
            strategies[single], single = apart, None
    group_clip = {pg: find_strategy(strategies.get(pg, "")) for pg in params}
    # the group's one other site (a linear layer's weight beside its bias), when its strategy gives its norm as
    # row parts and keeps its products: the rows op sums the parts into the factor (where Inductor would launch a
    # reduction of its own); the products' clipped sum is the strategy's own, from the factor (NOTES 37)
    others = [pg for pg in params if pg is not single and pg not in rows_together]
    by_rows = others[0] if rows_together and len(others) == 1 and norm_rows_of(
        others[0], strategies.get(others[0], "")) is not None else None

    def group_fn(*vals):
        env = dict(zip(inputs, vals))
        bsz = env[batch_node].shape[batch_dim]
        thr = threshold.value(env) if runtime else threshold
        sq, prepared = None, {}
        for pg in others:
            if pg is by_rows:
                sq, prepared[pg] = param_norm_rows(pg, strategies.get(pg, ""), env, bsz)
                continue
            n2, prepared[pg] = param_norm(pg, strategies.get(pg, ""), env, bsz, randomized)
            sq = n2 if sq is None else sq + n2
        sums = {}
        if rows_together:
            cols = [site_kind(pg.contributions[0].site.kind).column_sums(pg.contributions[0].site, env, bsz)
                    for pg in rows_together]
            coef, *row_sums = ops.rows_group_clipped_sum(cols, sq, thr, clip_fn, mean)
            for pg, s in zip(rows_together, row_sums):
                sums[pg] = _as_grad(pg, _finish_fused(pg, s.reshape(pg.contributions[0].site.node.meta["val"].shape),
                                                      env))
        elif single is not None:
            c = single.contributions[0]
            a, b = c.site.fused_inputs(env, bsz)
            rest = sq if sq is not None else a.new_zeros((bsz,), dtype=ops.norm_dtype(a.dtype, b.dtype))
            s, coef = group_clip[single].group_clip(a, b, rest, float(c.scale * c.scale), thr, clip_fn,
                                                        mean, budget_bytes)
            sums[single] = _as_grad(single, _finish_fused(single, s, env))
        else:
            coef = group_clip_factors(sq, thr, clip_fn, mean, bsz)
        outs = [sums[pg] if pg in sums else param_clipped_sum(pg, prepared[pg], coef, strategies.get(pg, ""), env)
                for pg in params]
        if runtime:
            outs.append(quantile_count(sq, thr, mean, bsz))
        return outs

    return group_fn


# ----------------------------------------------------------------------------------------------------------
# a group of several parameters (flat clipping) in pieces: one trace per parameter's norm, one for the clip
# factors, one per parameter's clipped sum. Identical pieces (the same layer in identical blocks) are traced once
# (trace_cache.py), where a flat group's single trace of every site was most of the pass (benchmarks/NOTES.md 24).


class NotPieceable(Exception):
    """What a parameter's clipped sum reads is not a structure of tensors: trace the group whole."""


def norm_piece(pg: ParamGrad, inputs: list, batch_node: fx.Node, batch_dim: int, strategy: str) -> Callable:
    """-> [squared norms (B,), *the tensors its clipped sum reads]; their structure is left on the traced module
    (`piece_spec`)."""

    def fn(*vals):
        env = dict(zip(inputs, vals))
        n2, prepared = param_norm(pg, strategy, env, env[batch_node].shape[batch_dim])
        leaves, spec = torch.utils._pytree.tree_flatten(prepared)
        if not all(isinstance(x, torch.Tensor) for x in leaves):
            raise NotPieceable(f"parameter `{pg.name}`")
        fn.spec = spec
        return [n2, *leaves]

    return fn


def factor_piece(inputs: list, batch_node: fx.Node, batch_dim: int, norms: list, threshold, clip_fn: str,
                 mean: bool) -> Callable:
    """-> [the group's clip factors (B,)] (+ its quantile count under run-time thresholds), from the parameters'
    squared norms summed in parameter order (as group_fn sums them)."""
    runtime = isinstance(threshold, RuntimeThreshold)

    def fn(*vals):
        env = dict(zip(inputs, vals))
        bsz = env[batch_node].shape[batch_dim]
        sq = env[norms[0]]
        for n in norms[1:]:
            sq = sq + env[n]
        thr = threshold.value(env) if runtime else threshold
        coef = group_clip_factors(sq, thr, clip_fn, mean, bsz)
        return [coef, quantile_count(sq, thr, mean, bsz)] if runtime else [coef]

    return fn


def sum_piece(pg: ParamGrad, inputs: list, leaves: list, spec, coef: fx.Node, strategy: str) -> Callable:
    """-> [the parameter's clipped sum], from the tensors its norm piece kept (`leaves`, structured by `spec`)."""

    def fn(*vals):
        env = dict(zip(inputs, vals))
        prepared = torch.utils._pytree.tree_unflatten([env[n] for n in leaves], spec)
        return [param_clipped_sum(pg, prepared, env[coef], strategy, env)]

    return fn


def trace(fn: Callable, inputs: list[fx.Node], decompositions: dict) -> fx.GraphModule:
    """fn traced over the inputs' fake values."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in inputs]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with fake_mode:
        return make_fx(fn, decomposition_table=decompositions, tracing_mode="real")(*vals)


def insert_traced(graph: fx.Graph, fn: Callable, inputs: list[fx.Node], decompositions: dict,
                  before: fx.Node | None = None) -> list[fx.Node]:
    """Trace fn over the inputs' fake values and copy its nodes into `graph` after the last input (or before
    `before`)."""
    return copy_traced(graph, trace(fn, inputs, decompositions), inputs, before)


def copy_traced(graph: fx.Graph, traced: fx.GraphModule, inputs: list[fx.Node], before: fx.Node | None = None,
                fresh_values: bool = False) -> list[fx.Node]:
    """Copy the nodes of `traced` into `graph`, its placeholders bound to `inputs`, after the last input (or before
    `before`). fresh_values: a trace made over other inputs (trace_cache.py): every copied node gets its own fake
    value, computed from its arguments' (values shared between nodes would read as aliases to later passes)."""
    if before is not None:
        anchor = before
    else:
        order = {n: i for i, n in enumerate(graph.nodes)}
        last = max(inputs, key=lambda n: order[n])
        anchor = last.next
    while anchor.op == "placeholder":  # never insert between placeholders
        anchor = anchor.next
    env: dict = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for ph, n in zip(placeholders, inputs):
        env[ph] = n
    outputs = None
    fake_mode = None
    if fresh_values:
        from torch._guards import detect_fake_mode

        fake_mode = detect_fake_mode([n.meta["val"] for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)])
    with graph.inserting_before(anchor):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = fx.node.map_arg(n.args[0], lambda x: env[x])
                continue
            if n.op == "get_attr":  # a tensor constant of the traced code (e.g. in a reference op body)
                env[n] = _copy_constant(graph, traced, n)
                continue
            env[n] = new = graph.node_copy(n, lambda x: env[x])
            if fresh_values and "val" in n.meta:
                with fake_mode:
                    new.meta["val"] = _fresh_value(n, new)
    return list(outputs)


def _fresh_value(old: fx.Node, new: fx.Node):
    """The fake value of `new`, a copy of `old` over other inputs with the same metadata (trace_cache.py). A
    functional Triton launch's outputs are fresh clones of its inputs: new tensors of the same sizes and strides,
    made directly (its fake implementation clones each through as_strided over symbolic sizes: half of the
    inline stage's time, NOTES 38); every other node's value is computed from its arguments'."""
    if new.target is triton_kernel_wrapper_functional:
        return {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                for k, v in old.meta["val"].items()}
    args, kwargs = fx.node.map_arg((new.args, new.kwargs), lambda x: x.meta["val"])
    return new.target(*args, **kwargs)


def _copy_constant(graph: fx.Graph, traced: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Move a get_attr constant of `traced` onto the module that owns `graph`, under a fresh name."""
    owner = graph.owning_module
    if owner is None:
        raise RuntimeError(f"cannot copy the constant `{node.target}` into a graph without an owning module")
    value = getattr(traced, node.target)
    i = 0
    while hasattr(owner, f"_dpcompile_constant{i}"):
        i += 1
    name = f"_dpcompile_constant{i}"
    owner.register_buffer(name, value, persistent=False)
    new = graph.get_attr(name)
    new.meta.update(node.meta)
    return new


def zero_grads(graph: fx.Graph, params: list) -> None:
    """B == 0: every trainable parameter's clipped sum is zero."""
    out = graph.output_node()
    outs = list(out.args[0])
    anchor = out
    for pg in params:
        # the parameter's shape, not its gradient's: the gradient may carry sizes the B = 0 graph never binds
        # (a Linear after flattening a pooled image of symbolic size)
        val = pg.placeholder.meta["val"]
        with graph.inserting_before(anchor):
            z = graph.call_function(aten.full.default, (list(val.shape), 0),
                                    {"dtype": val.dtype, "layout": torch.strided, "device": val.device,
                                     "pin_memory": False})
            z.meta["val"] = val
        outs[pg.out_pos] = z
    out.args = (outs,)


def set_outputs(graph: fx.Graph, replacements: dict) -> None:
    out = graph.output_node()
    outs = list(out.args[0])
    for pos, node in replacements.items():
        outs[pos] = node
    out.args = (outs,)


def decompose_kept_ops(graph: fx.Graph) -> None:
    """Ops the DP table keeps whole so that the pass sees one stable pattern (embedding_dense_backward) are
    decomposed again wherever the pass left them in place (B == 1 graphs, frozen-free leftovers): Inductor
    refuses to fall back on an op that has a decomposition."""
    from torch._inductor.decomposition import select_decomp_table

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding_dense_backward.default:
            continue
        inputs = node.all_input_nodes

        def fn(*vals, node=node, inputs=inputs):
            env = dict(zip(inputs, vals))
            return [node.target(*_arg(env, node.args), **_arg(env, dict(node.kwargs)))]

        (new,) = insert_traced(graph, fn, inputs, select_decomp_table())
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def inline_triton_ops(graph: fx.Graph, decompositions: dict) -> None:
    """For Inductor: replace every node of an op defined with codegen.registry.dp_op (a triton_op) by its body,
    traced under functionalization (which is where triton_op decomposes), so that Inductor emits the Triton launches itself and fuses the PyTorch parts
    (row sums, casts, clip factors) into its own kernels. Left as op calls, each would run its Python body on every
    step, which made the step host-bound (measured: 0.4 ms of host time per op call on an H100 machine)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize

    inlined = inlined_ops()
    cache = GroupTraceCache()  # identical blocks call the same ops on the same shapes: one trace each
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in inlined:
            continue
        inputs = node.all_input_nodes

        def fn(*vals, node=node, inputs=inputs):
            env = dict(zip(inputs, vals))
            out = node.target(*_arg(env, node.args), **_arg(env, dict(node.kwargs)))
            return list(out) if isinstance(out, (tuple, list)) else [out]

        key = canonical(inputs, node.target, node.args, node.kwargs)  # everything fn reads
        traced, reused = traced_for(cache, key, lambda: trace(dispatch_functionalize(fn), inputs, decompositions))
        new = copy_traced(graph, traced, inputs, before=node, fresh_values=reused)
        if isinstance(node.meta.get("val"), (tuple, list)):  # multi-output op: its users are getitems
            for user in list(node.users):
                assert user.target is operator.getitem, user
                user.replace_all_uses_with(new[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(new[0])
        graph.erase_node(node)
    log.info("flashdp: %d op bodies traced for inlining, %d reused from an identical call's trace", cache.misses,
             cache.hits)
