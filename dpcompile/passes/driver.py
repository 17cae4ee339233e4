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
from dataclasses import dataclass
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
    insert_traced, make_group_fn, set_outputs, trace, zero_grads, \
    NotPieceable, factor_piece, group_clip_param, norm_piece, sum_piece
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
        # Inductor runs its joint-graph passes on inference graphs too (a call under torch.no_grad(), an evaluation
        # loop): no tangents and no gradient outputs, nothing to clip; reading it as a joint graph failed. A graph
        # with either goes through the pass, which clips it or refuses it
        descs = graph.output_node().meta.get("desc") or ()
        if any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes) or any(
                getattr(d, "grad_of", None) is not None for d in descs):
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
    quantile count goes to that input's gradient output (set_quantile_counts).
    A group is traced whole, and reused whole where groups repeat (per-layer groups of identical blocks); a group
    that does not repeat but holds parameters that do (a flat group) is traced in pieces (_insert_pieces)."""
    replacements = {}
    counts = {}
    cache = GroupTraceCache()
    jobs = [_group_job(ctx, io, group, pgs, choices, randomized) for group, pgs in groups_of(io).items()]
    repeats = Counter(job.key for job in jobs if job.key is not None)
    for job in jobs:
        nodes = None
        forms = _norm_forms(job, io) if job.key is not None and repeats[job.key] == 1 else None
        if forms is not None and len(set(f for _, f in forms)) < len(forms):  # pieces save traces: some repeat
            nodes = _insert_pieces(graph, ctx, io, job, forms, cache)
        if nodes is None:
            nodes = _insert_whole(graph, ctx, io, job, cache, randomized)
        if ctx.runtime_thresholds:
            counts[job.group] = nodes.pop()
        for pg, node in zip(job.pgs, nodes):
            replacements[pg.out_pos] = node
    set_outputs(graph, replacements)
    if ctx.runtime_thresholds:
        set_quantile_counts(graph, ctx, io, counts)
    log.info("flashdp: %d clipping traces made, %d reused from an identical one (whole groups, or the pieces of "
             "a group of several parameters)", cache.misses, cache.hits)


@dataclass
class GroupJob:
    """One clipping group's replacement to trace: its parameters, every graph value it reads, its threshold (a
    number or a RuntimeThreshold), each parameter's strategy, and the canonical form of the whole function
    (None: never reused, e.g. randomized sites, whose probe site ids differ per parameter)."""

    group: object
    pgs: list
    inputs: list
    threshold: object
    strategies: dict
    budget: int
    key: Optional[tuple]


def _group_job(ctx: PassContext, io: GraphIO, group, pgs: list, choices: dict, randomized) -> GroupJob:
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
    key = None if randomized is not None else canonical(
        inputs, pgs, io.batch_node, io.batch_dim, threshold, ctx.options.clip_fn,
        ctx.options.loss_reduction, [strategies.get(pg, "") for pg in pgs], budget)
    return GroupJob(group, pgs, inputs, threshold, strategies, budget, key)


def _norm_forms(job: GroupJob, io: GraphIO) -> Optional[list]:
    """(the values its norm piece reads, the piece's canonical form) of each parameter of the group, or None where
    the group cannot be traced in pieces: a single parameter, a strategy that forms the group's clip factor itself
    (single_pass: no separate factor piece), or a form that cannot be written."""
    if len(job.pgs) < 2 or group_clip_param(job.pgs, job.strategies) is not None:
        return None
    forms = []
    for pg in job.pgs:
        ins = group_inputs([pg], io.batch_node)
        forms.append((ins, canonical(ins, "norm", pg, io.batch_node, io.batch_dim, job.strategies.get(pg, ""))))
    return None if any(f is None for _, f in forms) else forms


def _insert_whole(graph: fx.Graph, ctx: PassContext, io: GraphIO, job: GroupJob, cache: GroupTraceCache,
                  randomized) -> list:
    """The group's replacement traced as one function (rewrite.make_group_fn) and inserted."""
    fn = make_group_fn(job.pgs, job.inputs, io.batch_node, io.batch_dim, job.threshold, ctx.options.clip_fn,
                       ctx.options.loss_reduction == "mean", job.strategies, job.budget, randomized)
    traced, reused = traced_for(cache, job.key, lambda: trace(fn, job.inputs, ctx.decompositions))
    return copy_traced(graph, traced, job.inputs, fresh_values=reused)


def _insert_pieces(graph: fx.Graph, ctx: PassContext, io: GraphIO, job: GroupJob, forms: list,
                   cache: GroupTraceCache) -> Optional[list]:
    """A group of several parameters traced in pieces (rewrite.norm_piece, factor_piece, sum_piece), each reused
    across identical ones, and inserted where the whole group's trace would go (after its last input), in the
    same order: every norm, the factors, every clipped sum. None: a piece cannot be formed (trace it whole)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max(job.inputs, key=lambda n: order[n]).next
    bnode, bdim, pgs, strategies, threshold = io.batch_node, io.batch_dim, job.pgs, job.strategies, job.threshold

    def traced_piece(fn, ins, *form):
        return traced_for(cache, canonical(ins, *form), _tracer(fn, ins, ctx))

    norms = []
    try:
        for pg, (ins, form) in zip(pgs, forms):  # every norm traced before anything is inserted: a refusal
            fn = norm_piece(pg, ins, bnode, bdim, strategies.get(pg, ""))  # leaves the graph as it was
            norms.append((ins, *traced_for(cache, form, _tracer(fn, ins, ctx))))
    except NotPieceable:
        return None
    kept = []
    for ins, traced, reused in norms:
        n2, *leaves = copy_traced(graph, traced, ins, before=anchor, fresh_values=reused)
        kept.append((n2, leaves, traced.piece_spec))
    n2s = [n2 for n2, _, _ in kept]
    ins = [bnode, *n2s] + ([threshold.node] if ctx.runtime_thresholds else [])
    mean = ctx.options.loss_reduction == "mean"
    fn = factor_piece(ins, bnode, bdim, n2s, threshold, ctx.options.clip_fn, mean)
    traced, reused = traced_piece(fn, ins, "factor", bnode, bdim, n2s, threshold, ctx.options.clip_fn, mean)
    coef, *count = copy_traced(graph, traced, ins, before=anchor, fresh_values=reused)
    sums = []
    for pg, (_, leaves, spec) in zip(pgs, kept):
        ins = list(dict.fromkeys(group_inputs([pg], bnode) + leaves + [coef]))
        st = strategies.get(pg, "")
        traced, reused = traced_piece(sum_piece(pg, ins, leaves, spec, coef, st), ins, "sum", pg, leaves,
                                      str(spec), coef, st)
        sums += copy_traced(graph, traced, ins, before=anchor, fresh_values=reused)
    return sums + count


def _tracer(fn, ins: list, ctx: PassContext):
    """make() for traced_for: fn traced over the inputs, the structure of a norm piece's outputs kept with it."""
    def make():
        gm = trace(fn, ins, ctx.decompositions)
        gm.piece_spec = getattr(fn, "spec", None)
        return gm
    return make


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
