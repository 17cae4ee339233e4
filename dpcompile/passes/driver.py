"""The joint-graph pass, one named function per stage:

    read_graph → batch_dims → discover → plan → randomized_norms → rewrite → verify → inline

`DPJointPass` is what the backends install: Inductor calls it as `joint_custom_pre_pass`, the eager backend calls
it from its partition function. Both see the joint graph after the decomposition table of backend.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx

from ..errors import DPCompileError

from . import one_sample
from .batchdim import BatchDimAnalysis
from .context import PassContext, source_hash
from .discover import discover_contributions
from .loss_reduction import check_loss_reduction
from .sample_inputs import SampleInputs
from .graph_io import GraphIO, batch_symbol, grad_output_positions, read_graph, size_hints, tangent_seeds
from .plan import check_forced_globs, linear_shape, plan_group, plan_rows
from .probes import randomized_norms
from .rewrite import RuntimeThreshold, copy_traced, decompose_kept_ops, group_inputs, inline_triton_ops, \
    insert_traced, make_group_fn, set_outputs, trace, zero_grads
from .trace_cache import GroupTraceCache, canonical, traced_for
from .sites import site_kind
from .verify import verify_coverage

log = logging.getLogger("dpcompile")

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # pragma: no cover - very old torch
    _PassBase = object


class DPJointPass(_PassBase):
    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def __call__(self, graph: fx.Graph) -> None:
        run_dp_pass(graph, self.ctx)

    def uuid(self) -> Optional[str]:
        # every option and the pass source: a cached graph compiled with another C must never be reused.
        # Graphs that may hold randomized sites are not cached (None): the optimizer's privacy accounting reads
        # which sites the pass randomized (ctx.randomized), and a cache hit would skip the pass.
        if self.ctx.options.uses_randomized():
            return None
        return hashlib.sha256((source_hash() + self.ctx.key()).encode()).hexdigest()


@contextlib.contextmanager
def _stage(ctx: PassContext, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        ctx.stage_seconds[name] = ctx.stage_seconds.get(name, 0.0) + time.perf_counter() - start


def run_dp_pass(graph: fx.Graph, ctx: PassContext) -> None:
    io = read_graph(graph, ctx)
    ctx.report.clear()
    ctx.randomized.clear()
    ctx.stage_seconds.clear()
    ctx.classified = False
    if io.batch_size == 0:  # an empty (Poisson) batch: clipped sums are zero
        zero_grads(graph, [pg for _, pg in io.params])
        if ctx.runtime_thresholds:
            set_quantile_counts(graph, ctx, io, {})
        ctx.report.extend(plan_rows(io.params, ctx, empty=True))
    else:
        products = {}
        if io.batch_size == 1:  # one sample: each gradient is that sample's gradient; nothing can mix samples
            one_sample.whole_sites(io.params)
            products = one_sample.randomized_products(graph, io.params, ctx, io.primals)
        else:
            with _stage(ctx, "batch_dims"):
                analysis = batch_dims(graph, ctx, io)
            try:
                with _stage(ctx, "discover"):
                    discover(io, analysis)
                    check_loss_reduction(graph, analysis, len(io.primals),
                                         [io.primals[i] for i in (*ctx.batch_inputs, *ctx.sample_candidates)
                                          if i in io.primals], ctx.options.loss_reduction)
            except DPCompileError as exc:  # named: the inputs taken to carry samples without evidence
                refined = analysis.samples.refine(exc)
                if refined is exc:
                    raise
                raise refined from exc
        with _stage(ctx, "plan"):
            choices = plan(graph, ctx, io)
        with _stage(ctx, "rewrite"):
            rewrite(graph, ctx, io, choices, randomized_norms(graph, ctx, io, choices, products))
        bsym, bhint = batch_symbol(io.batch_extent)
        ctx.report.extend(plan_rows(io.params, ctx, choices=choices, batch_symbol=bsym, batch_hint=bhint,
                                    randomized=set(products), hints=size_hints(graph)))
        ctx.classified = True
    with _stage(ctx, "verify"):
        verify(graph, ctx, io)
    with _stage(ctx, "inline"):
        inline(graph, ctx)
    _log_summary(ctx, io)


def batch_dims(graph: fx.Graph, ctx: PassContext, io: GraphIO):
    """Which dim of every value carries samples: seeded by the batch inputs, then by the tangents (each carries
    samples the way its forward output does, which the first run tells)."""
    samples = SampleInputs(graph, ctx, io)  # the batch input, and the other inputs that carry samples (data flow)
    ctx.input_sources = samples.input_sources()
    seeds = dict(samples.seeds)
    first = BatchDimAnalysis(graph, seeds, io.batch_size)
    seeds.update(tangent_seeds(graph, first.states, len(io.primals)))
    analysis = BatchDimAnalysis(graph, seeds, io.batch_size)
    analysis.samples = samples
    return analysis


def discover(io: GraphIO, analysis) -> None:
    """Each parameter's gradient down to its sites."""
    for _, pg in io.params:
        discover_contributions(pg, analysis.state, io.batch_size)


def groups_of(io: GraphIO) -> dict:
    groups: dict[str, list] = {}
    for info, pg in io.params:
        groups.setdefault(info.group, []).append(pg)
    return groups


def plan(graph: fx.Graph, ctx: PassContext, io: GraphIO) -> dict:
    """{pg: SiteChoice}: a strategy per site, per clipping group, from the registry's costs."""
    check_forced_globs(ctx.options, [info.name for info, _ in io.params])
    bsym, bhint = batch_symbol(io.batch_extent)
    hints = size_hints(graph)
    choices: dict = {}
    memo: dict = {}
    for pgs in groups_of(io).values():
        shapes = {pg: linear_shape(pg, io.batch_node, io.batch_dim, memo) for pg in pgs
                  if pg.fused and site_kind(pg.contributions[0].site.kind).strategies}
        choices.update(plan_group(pgs, shapes, ctx.options, bsym, bhint, hints))
    return choices


def rewrite(graph: fx.Graph, ctx: PassContext, io: GraphIO, choices: dict, randomized) -> None:
    """Per group: norms → clip factors → clipped sums, traced and inserted; the outputs point at the sums.
    Run-time thresholds (max_grad_norm="adaptive"): C_g is read from the thresholds input, and each group's
    quantile count goes to that input's gradient output (set_quantile_counts)."""
    replacements = {}
    counts = {}
    cache = GroupTraceCache()
    for group, pgs in groups_of(io).items():
        inputs = group_inputs(pgs, io.batch_node)
        if randomized is not None and any(pg in randomized.site_ids for pg in pgs):
            extra = [randomized.seed] + [randomized.products[pg][0] for pg in pgs if pg in randomized.products]
            inputs += [n for n in dict.fromkeys(extra) if n not in inputs]
        if ctx.runtime_thresholds:
            thresholds = io.primals[ctx.threshold_input]
            inputs += [thresholds] if thresholds not in inputs else []
            threshold = RuntimeThreshold(thresholds, ctx.threshold_groups.index(group))
        else:
            threshold = ctx.thresholds[group]
        strategies = {pg: choices[pg].op_strategy for pg in pgs if pg in choices}
        budget = int(ctx.options.single_pass_budget_mb * 2**20)
        fn = make_group_fn(pgs, inputs, io.batch_node, io.batch_dim, threshold, ctx.options.clip_fn,
                           ctx.options.loss_reduction == "mean", strategies, budget, randomized)
        # everything fn reads; a graph with randomized sites is never reused (site ids differ per parameter)
        key = None if randomized is not None else canonical(
            inputs, pgs, io.batch_node, io.batch_dim, threshold, ctx.options.clip_fn,
            ctx.options.loss_reduction, [strategies.get(pg, "") for pg in pgs], budget)
        nodes = _insert_group(graph, fn, inputs, ctx, cache, key)
        if ctx.runtime_thresholds:
            counts[group] = nodes.pop()
        for pg, node in zip(pgs, nodes):
            replacements[pg.out_pos] = node
    set_outputs(graph, replacements)
    if ctx.runtime_thresholds:
        set_quantile_counts(graph, ctx, io, counts)
    log.info("flashdp: %d clipping groups traced, %d reused from an identical group's trace", cache.misses,
             cache.hits)


def _insert_group(graph: fx.Graph, fn, inputs: list, ctx: PassContext, cache: GroupTraceCache, key) -> list:
    """The group's traced nodes inserted into the graph: from the trace of an identical group where there is one
    (trace_cache.py), else traced now."""
    traced, reused = traced_for(cache, key, lambda: trace(fn, inputs, ctx.decompositions))
    return copy_traced(graph, traced, inputs, fresh_values=reused)


def set_quantile_counts(graph: fx.Graph, ctx: PassContext, io: GraphIO, counts: dict) -> None:
    """The thresholds input's gradient output becomes the (G,) float64 vector of the groups' quantile counts
    sum_i (1[||g_i|| <= C_g] - 1/2), in ctx.threshold_groups order: what the backend's run-time record hands the
    optimizer. A group without a gradient in this graph has every norm 0 (+B/2); an empty batch gives zeros."""
    thresholds = io.primals[ctx.threshold_input]
    pos = grad_output_positions(graph, len(io.primals)).get(ctx.threshold_input)
    outs = list(graph.output_node().args[0])
    if pos is None or pos >= len(outs):
        raise DPCompileError("flashdp: the joint graph has no gradient output for the run-time thresholds input "
                             "(max_grad_norm='adaptive'); this torch version's AOTAutograd is not supported")
    order = list(ctx.threshold_groups)
    present = [g for g in order if g in counts]
    inputs = [thresholds, io.batch_node] + [counts[g] for g in present]
    empty = io.batch_size == 0

    def fn(thr, batch, *values):
        if empty:
            return [torch.zeros_like(thr)]
        by_group = dict(zip(present, values))
        half = thr.new_full((), 0.5) * batch.shape[io.batch_dim]
        return [torch.stack([by_group[g] if g in by_group else half for g in order]).to(thr.dtype)]

    (node,) = insert_traced(graph, fn, inputs, ctx.decompositions)
    set_outputs(graph, {pos: node})


def verify(graph: fx.Graph, ctx: PassContext, io: GraphIO) -> None:
    """Dead originals removed, kept ops decomposed, then the coverage check."""
    graph.eliminate_dead_code()
    decompose_kept_ops(graph)
    graph.lint()
    verify_coverage(graph, ctx, io.params)


def inline(graph: fx.Graph, ctx: PassContext) -> None:
    """Inductor only: the dp_op bodies inlined, so that Inductor emits their launches itself."""
    if ctx.inline_ops:
        inline_triton_ops(graph, ctx.decompositions)
        graph.eliminate_dead_code()
        graph.lint()


def _log_summary(ctx: PassContext, io: GraphIO) -> None:
    strategies = Counter(row["strategy"] for row in ctx.report)
    log.info("flashdp: %d trainable parameters in %d clipping groups (%s), strategies: %s",
             len(io.params), len({info.group for info, _ in io.params}), ctx.options.clipping
             if isinstance(ctx.options.clipping, str) else "explicit groups",
             ", ".join(f"{k} x{v}" for k, v in sorted(strategies.items())))
    log.info("flashdp: the pass took %s", ", ".join(f"{k} {v:.1f} s" for k, v in ctx.stage_seconds.items()))
