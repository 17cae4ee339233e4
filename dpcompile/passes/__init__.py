"""The joint-graph pass: batch dims -> parameter-gradient sites -> plan -> rewrite -> coverage check.

`DPJointPass` is what the backends install: Inductor calls it as `joint_custom_pre_pass`, the eager backend
calls it from its partition function. Both see the joint graph after the decomposition table of backend.py.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx

from ..options import DPOptions
from ..strategy_registry import find_strategy
from .batchdim import (BatchDimAnalysis, BDim, Mixed, graph_shape_env, guard_batch_sizes, size_hint,
                       sym_expr)
from .discover import Contribution, ParamGrad, discover_contributions
from . import strategies  # noqa: F401  (registers the built-in strategies)
from .sites import bmm, conv, embedding, linear, rows, site_kind, whole  # noqa: F401  (registers the kinds)
from .plan import LinearShape, check_forced_globs, check_randomizable, plan_group, plan_rows
from .rewrite import (RandomizedNorms, decompose_kept_ops, group_inputs, inline_triton_ops, insert_traced,
                      make_group_fn, set_outputs, zero_grads)
from .verify import verify_coverage

log = logging.getLogger("dpcompile")


@dataclass
class ParamInfo:
    name: str
    group: str


@dataclass
class PassContext:
    """What the backend knows about the graph inputs, indexed by Dynamo input position."""

    options: DPOptions
    params: dict  # input index -> ParamInfo (trainable parameters only)
    batch_inputs: dict  # input index -> sample dim; the main batch input first
    thresholds: dict  # group name -> C_g
    decompositions: dict
    input_sources: dict = field(default_factory=dict)  # Dynamo source name of each batch input -> sample dim
    inline_ops: bool = False  # Inductor: inline the triton_op bodies after the coverage check
    report: list = field(default_factory=list)  # filled by the pass: one row per trainable parameter
    # filled by the pass: input index of each parameter whose per-sample norm this graph estimates with probes
    # (randomized norms, docs/randomized.md) -> its site id; and whether the pass ran on samples (B >= 1)
    randomized: dict = field(default_factory=dict)
    classified: bool = False
    exact_norms: bool = False  # randomized_ops.exact_norms() was on when the graph was built (tests only)

    def randomized_groups(self) -> dict:
        """Clipping group -> C_g of every group that holds a randomized site of this graph."""
        return {self.params[i].group: self.thresholds[self.params[i].group] for i in self.randomized}

    def key(self) -> str:
        parts = [self.options.cache_key(), repr(sorted((k, v.name, v.group) for k, v in self.params.items())),
                 repr(sorted(self.batch_inputs.items())), repr(sorted(self.thresholds.items())), repr(self.inline_ops),
                 repr(self.exact_norms)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


#: The sources that decide what the DP pass makes of a Dynamo graph, and so what a cached compiled graph holds:
#: part of the cache key (DPJointPass.uuid), next to PassContext.key(). Only these, so that editing the CLI, the
#: optimizer or the docs does not throw away every compiled graph (and one that does change a graph is never
#: served stale):
#:   passes/      the pass itself (discovery, planning, rewriting, the coverage check)
#:   codegen/     the custom ops and Triton kernels the rewritten graph calls (Inductor inlines their bodies)
#:   options.py   how options are parsed and defaulted (PassContext.key() has the parsed values, not this code)
#:   clipping.py  clip_factors, traced into the graph by rewrite.py and codegen/ops.py
#:   backend.py   only dp_decomposition_table(): the decompositions run before the pass sees the joint graph. The
#:                rest of backend.py builds the PassContext, whose every field is in PassContext.key().
#: Not included: privacy/ (the optimizer, noise and accounting run outside the graph; randomized_accounting only
#: records runs, and graphs with randomized sites are never cached), errors.py (a refusal is not cached), cli.py,
#: compile.py (it passes options, which are in the key), data.py, hf.py, memarc/, explain.py.
GRAPH_SOURCES = ("passes", "codegen", "options.py", "clipping.py")
GRAPH_FUNCTIONS = {"backend.py": ("dp_decomposition_table",)}


def _source_hash(root: Path) -> str:
    """sha256 of the graph-deciding sources of the package at `root` (the dpcompile directory): GRAPH_SOURCES whole,
    and of GRAPH_FUNCTIONS' files only the named functions (the whole file if one is not found)."""
    import ast

    h = hashlib.sha256()

    def add(rel: str, data: bytes) -> None:
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())

    for name in GRAPH_SOURCES:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            add(f.relative_to(root).as_posix(), f.read_bytes())
    for name, functions in sorted(GRAPH_FUNCTIONS.items()):
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text()
        tree = ast.parse(text)
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if not all(f in defs for f in functions):
            add(name, text.encode())
            continue
        for f in functions:
            add(f"{name}:{f}", ast.get_source_segment(text, defs[f]).encode())
    return h.hexdigest()


_SOURCE_HASH = None


def source_hash() -> str:
    """_source_hash of this package, computed once per process."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        _SOURCE_HASH = _source_hash(Path(__file__).resolve().parent.parent)
    return _SOURCE_HASH


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


# ----------------------------------------------------------------------------------------------------------


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


def _tangent_seeds(graph: fx.Graph, states: dict, n_primals: int) -> dict:
    """Each tangent carries samples the way its forward output does (a scalar loss's tangent carries none)."""
    out = graph.output_node()
    outs = list(out.args[0])
    descs = out.meta.get("desc") or [None] * len(outs)
    tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    fw = [(o, d) for o, d in zip(outs[: len(outs) - n_primals], descs) if isinstance(o, fx.Node)]
    seeds = {}
    for i, t in enumerate(tangents):
        target = getattr(t.meta.get("desc"), "output", None)
        match = [o for o, d in fw if d is not None and d == target]
        if not match and i < len(fw):
            match = [fw[i][0]]
        s = states.get(match[0]) if match else None
        seeds[t] = s if isinstance(s, BDim) else None
    return seeds


def run_dp_pass(graph: fx.Graph, ctx: PassContext) -> None:
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
            index_of[id(pg)] = idx
    batch_idx, batch_dim = next(iter(ctx.batch_inputs.items()))
    batch_node = primals[batch_idx]
    guard_batch_sizes(graph_shape_env(graph), batch_node.meta["val"].shape[batch_dim],
                      [primals[i].meta["val"].shape[d] for i, d in ctx.batch_inputs.items() if i != batch_idx])
    batch_size = sym_expr(batch_node.meta["val"].shape[batch_dim])

    ctx.report.clear()
    ctx.randomized.clear()
    ctx.classified = False
    if batch_size == 0:  # an empty (Poisson) batch: clipped sums are zero
        zero_grads(graph, [pg for _, pg in params])
        ctx.report.extend(plan_rows([(info, pg) for info, pg in params], ctx, empty=True))
        _finish(graph, ctx, params)
        return

    products: dict = {}
    if batch_size == 1:
        # one sample: each gradient is that sample's gradient; nothing can mix samples
        for _, pg in params:
            pg.contributions.append(Contribution(whole.site_of(pg.grad), []))
        products = _one_sample_randomized_sites(graph, params, ctx, primals)
    else:
        seeds = {primals[i]: BDim(d) for i, d in ctx.batch_inputs.items()}
        first = BatchDimAnalysis(graph, seeds, batch_size)
        seeds.update(_tangent_seeds(graph, first.states, len(primals)))
        analysis = BatchDimAnalysis(graph, seeds, batch_size)
        for _, pg in params:
            discover_contributions(pg, analysis.state, batch_size)

    groups: dict[str, list] = {}
    for info, pg in params:
        groups.setdefault(info.group, []).append(pg)
    check_forced_globs(ctx.options, [info.name for info, _ in params])
    bsym, bhint = _batch_symbol(batch_node.meta["val"].shape[batch_dim])
    hints = _size_hints(graph)
    choices: dict = {}
    for group, pgs in groups.items():
        shapes = {id(pg): linear_shape(pg, batch_node, batch_dim) for pg in pgs
                  if pg.fused and site_kind(pg.contributions[0].site.kind).strategies}
        choices.update(plan_group(pgs, shapes, ctx.options, bsym, bhint, hints))

    # randomized sites: one secret probe seed per call of the graph, a distinct site id per site
    rand_pgs = [pg for _, pg in params if id(pg) in products or
                (id(pg) in choices and _accounting(choices[id(pg)].strategy) == "randomized")]
    randomized = None
    if rand_pgs:
        randomized = RandomizedNorms(ctx.options.probes, ctx.options.probe_variant,
                                     _insert_probe_seed(graph, ctx, batch_node),
                                     {id(pg): i for i, pg in enumerate(rand_pgs)}, products)
        for pg in rand_pgs:
            ctx.randomized[index_of[id(pg)]] = randomized.site_ids[id(pg)]

    replacements = {}
    for group, pgs in groups.items():
        inputs = group_inputs(pgs, batch_node)
        if randomized is not None and any(id(pg) in randomized.site_ids for pg in pgs):
            extra = [randomized.seed] + [products[id(pg)][0] for pg in pgs if id(pg) in products]
            inputs += [n for n in dict.fromkeys(extra) if n not in inputs]
        fn = make_group_fn(pgs, inputs, batch_node, batch_dim, ctx.thresholds[group], ctx.options.clip_fn,
                           ctx.options.loss_reduction == "mean",
                           {k: c.op_strategy for k, c in choices.items() if k in {id(pg) for pg in pgs}},
                           int(ctx.options.single_pass_budget_mb * 2**20), randomized)
        new = insert_traced(graph, fn, inputs, ctx.decompositions)
        for pg, node in zip(pgs, new):
            replacements[pg.out_pos] = node
    set_outputs(graph, replacements)
    ctx.report.extend(plan_rows(params, ctx, choices=choices, batch_symbol=bsym, batch_hint=bhint,
                                randomized=set(products), hints=hints))
    ctx.classified = True
    _finish(graph, ctx, params)


def _accounting(name: str):
    record = find_strategy(name)
    return record.accounting if record else None


def _insert_probe_seed(graph: fx.Graph, ctx: PassContext, batch_node: fx.Node) -> fx.Node:
    """One dpcompile::probe_seed node, right after the placeholders: it runs on every call of the graph (an
    opaque op tagged nondeterministic_seeded: never folded, merged or cached). Its `like` input is a tangent on
    the batch's device where there is one, so that the seed is drawn in the backward (a forward alone draws none)."""
    from ..codegen import randomized_ops  # noqa: F401  (registers the op)

    device = batch_node.meta["val"].device
    like = next((n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")
                 and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device == device), batch_node)
    k, variant = ctx.options.probes, ctx.options.probe_variant

    def draw(x):
        return [torch.ops.dpcompile.probe_seed(x, k, variant)]

    (seed,) = insert_traced(graph, draw, [like], ctx.decompositions)
    return seed


def _one_sample_randomized_sites(graph: fx.Graph, params: list, ctx: PassContext, primals: dict) -> dict:
    """Batch-size-1 graphs: id(pg) -> (mm node, scale) for each parameter forced "randomized" whose gradient is, up
    to reshapes, casts and scalar factors, one mm whose operands carry the sample (the activations and the output
    gradient): the linear weight sites the batched graphs randomize. With one sample that mm's value is the
    sample's product s_0, whose norm is then estimated with the same law (dpcompile::persample_norm_randomized).
    Without this a sample would be clipped by its exact norm in a micro-batch of one and by an estimate in a
    larger one, and adding a sample to the data could change how the others are clipped. The batched graphs' own
    classification is compared with this one when both are compiled (privacy.optimizer), and a mismatch refused."""
    from .discover import _SHAPE_OPS

    forced = [(info, pg) for info, pg in params if ctx.options.forced_strategy(info.name) == "randomized"]
    if not forced:
        return {}
    aten = torch.ops.aten
    batch = _dependents(graph, {primals[i] for i in ctx.batch_inputs})
    tangents = _dependents(graph, {n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")})
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
        out[id(pg)] = (node, abs(scale))
    return out


def _dependents(graph: fx.Graph, roots: set) -> set:
    """The nodes that depend on any of `roots` (roots included)."""
    dep = set(roots)
    for n in graph.nodes:
        if n not in dep and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _batch_symbol(size):
    """(sympy symbol or None, a representative value) of the graph's batch size."""
    if isinstance(size, torch.SymInt):
        expr = sym_expr(size)
        hint = size.node.hint if size.node.hint is not None else 8
        return (expr if expr.free_symbols else None), int(hint)
    return None, int(size)


def _size_hints(graph: fx.Graph) -> dict:
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


def linear_shape(pg: ParamGrad, batch_node: fx.Node, batch_dim: int) -> LinearShape:
    """The (B, T, M) x (B, T, N) operand shapes a linear site's kernels will see, from the fake values."""
    from torch._guards import detect_fake_mode

    site = pg.contributions[0].site
    env = {n: n.meta["val"] for n in site.inputs}
    bsz = batch_node.meta["val"].shape[batch_dim]
    with detect_fake_mode(list(env.values()) + [batch_node.meta["val"]]):
        a, b = site.fused_inputs(env, bsz)
    itemsize = max(a.element_size(), b.element_size())
    # sizes as expressions, never int(): int() of a symbolic T would guard on (specialize) the sequence length
    return LinearShape(sym_expr(a.shape[0]), sym_expr(a.shape[1]), sym_expr(a.shape[2]), sym_expr(b.shape[2]),
                       itemsize)


def _finish(graph: fx.Graph, ctx: PassContext, params: list) -> None:
    graph.eliminate_dead_code()
    decompose_kept_ops(graph)
    graph.lint()
    verify_coverage(graph, ctx, params)
    if ctx.inline_ops:
        inline_triton_ops(graph, ctx.decompositions)
        graph.eliminate_dead_code()
        graph.lint()
    strategies = Counter(row["strategy"] for row in ctx.report)
    log.info("flashdp: %d trainable parameters in %d clipping groups (%s), strategies: %s",
             len(params), len({info.group for info, _ in params}), ctx.options.clipping
             if isinstance(ctx.options.clipping, str) else "explicit groups",
             ", ".join(f"{k} x{v}" for k, v in sorted(strategies.items())))
