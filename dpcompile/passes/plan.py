"""The planner: a strategy per parameter, chosen from sympy cost expressions, and the rows `explain` prints.

Strategies are records of the registry (dpcompile/strategy_registry.py); the built-in ones, what each does and
its cost, are in passes/strategies.py. Besides those: fused-rows / fused-embedding (a site kind's own ops), zero
(empty batch: the clipped sum is zero).

Costs are seconds on a device model, as sympy expressions in the graph's symbolic sizes (the batch size B and,
under dpcompile.compile, the sequence length T); every exact strategy is linear in B, so the choice depends on T,
the widths, the dtype and the clipping scope. One graph serves every B >= 2 and every T: its choices are made at
the sizes of the call that compiled it (the ShapeEnv's hints, read without adding a guard), and every strategy is
exact at every size, so only speed depends on them. The costs explain shows are per sample (the expression divided
by B, at those sizes).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy

from ..errors import OptionsError
from .symbolic import sym_expr
from .patterns import op_name
from ..strategy_registry import find_strategy, get_strategy, inexact_names, strategies


@dataclass(frozen=True)
class DeviceModel:
    """What the cost expressions assume of the GPU: achieved (not peak) rates on an H100, from
    benchmarks/bench_linear_ops.py (RESULTS.md). GPU time only: host-side launch work overlaps with the GPU as long
    as nothing synchronizes."""

    flops_16: float = 2.5e14  # our Triton bf16/fp16 GEMMs with a norm or a per-sample scale (150-390 TF/s measured)
    flops_vendor: float = 4.5e14  # cuBLAS bmm of the per-sample products (390-600 TF/s measured)
    flops_32: float = 4.0e13  # IEEE fp32 (no TF32: norms must not be rounded)
    # randomized probe products at fp32 accuracy, their in-kernel draws included (≈ 415 GFLOP in ≈ 11 ms per
    # gpt2-small T=16384 step, profile of RESULTS.md run 13c)
    flops_probe: float = 4.0e13
    bandwidth: float = 2.6e12  # HBM bytes/s
    launch: float = 3e-6  # GPU-side cost of one more kernel (ramp-up and tail of a small grid)
    chunk_loop: float = 3e-4  # host seconds per chunk of the chunked single-pass op (it runs as Python)


DEVICE = DeviceModel()


@dataclass
class LinearShape:
    """Sizes of a linear site's per-sample operands a (B, T, M), b (B, T, N): ints or sympy expressions in the
    graph's symbols (B and T symbolic under dynamic shapes)."""

    B: object
    T: object
    M: object
    N: object
    itemsize: int


def linear_shape(pg, batch_node, batch_dim: int, memo: dict | None = None) -> LinearShape:
    """The (B, T, M) x (B, T, N) operand shapes a linear site's kernels will see, from the fake values. memo: shapes
    already found in this graph, by what they depend on (the kind, each operand's sizes, dtype and sample layout):
    a model's repeated blocks trace the split of their operands once, not once per block."""
    from torch._guards import detect_fake_mode

    site = pg.contributions[0].site
    env = {n: n.meta["val"] for n in site.inputs}
    bsz = batch_node.meta["val"].shape[batch_dim]
    key = None
    if memo is not None:
        key = (site.kind, sym_expr(bsz), tuple(sorted((k, repr(v)) for k, v in site.info.items())),
               tuple((role, tuple(sym_expr(d) for d in env[n].shape), env[n].dtype, site.layouts[role])
                     for role, n in site.operands.items()))
        if key in memo:
            return memo[key]
    with detect_fake_mode(list(env.values()) + [batch_node.meta["val"]]):
        a, b = site.fused_inputs(env, bsz)
    itemsize = max(a.element_size(), b.element_size())
    # sizes as expressions, never int(): int() of a symbolic T would guard on (specialize) the sequence length
    shape = LinearShape(sym_expr(a.shape[0]), sym_expr(a.shape[1]), sym_expr(a.shape[2]), sym_expr(b.shape[2]),
                        itemsize)
    if key is not None:
        memo[key] = shape
    return shape


def linear_costs(s: LinearShape, budget_bytes: float, dev: DeviceModel = DEVICE, probes: int = 32) -> dict:
    """Seconds for one linear weight site's norm + clipped sum under each costed strategy of the registry (sympy
    expressions in B). The strategies that are not exact ("randomized", "randomized_stored": k = probes products
    per sample) are costed so that explain can show them; plan_group only ever takes them where the user forced
    one."""
    return {st.name: st.cost(s, budget_bytes, dev, probes) for st in strategies() if st.cost is not None}


def _inexact() -> tuple:
    return inexact_names()




def evaluate(expr, batch_symbol, batch_hint: int, hints: dict | None = None) -> float:
    """expr at the batch size batch_hint and the other symbols at `hints` (symbol -> value)."""
    expr = sympy.sympify(expr)
    if batch_symbol is not None:
        expr = expr.subs(batch_symbol, batch_hint)
    if hints and expr.free_symbols:
        expr = expr.subs({s: hints[s] for s in expr.free_symbols if s in hints})
    if expr.free_symbols:
        raise ValueError(f"cost {expr} has symbols {sorted(map(str, expr.free_symbols))} without a size hint")
    return float(expr)


def choose_linear(costs: dict, allowed: tuple, batch_symbol, batch_hint: int, hints: dict | None = None) -> str:
    return min(allowed, key=lambda k: evaluate(costs[k], batch_symbol, batch_hint, hints))


@dataclass
class SiteChoice:
    strategy: str
    costs: dict  # strategy -> sympy cost (seconds); empty for non-linear sites
    forced: bool = False
    chunked: bool = False  # the site's per-sample products at the compiled batch size exceed the budget
    stored_products: bool = False  # randomized: the estimate taken from stored products (randomized_stored)

    @property
    def op_strategy(self) -> str:
        """The strategy as the rewrite applies it (Strategy.op_strategy): over the budget, single_pass runs chunked;
        within it, a randomized site's clipped sum forms the products with the vendor GEMM and reduces them."""
        record = find_strategy(self.strategy)
        return record.op_strategy(self.chunked, self.stored_products) if record else self.strategy


def plan_group(pgs: list, shapes: dict, options, batch_symbol, batch_hint: int, hints: dict | None = None) -> dict:
    """{pg: SiteChoice} for one clipping group. `shapes` maps pg -> LinearShape for fused linear sites;
    `hints` gives the value of every other symbol in their sizes (the sequence length) at the compiled call.

    Candidates come from the strategy registry. A strategy that forms the group's clip factor itself (group_clip:
    single_pass) needs every other norm of the group first, so at most one site per group takes it (the one it
    saves most on); the others choose among the exact strategies whose `requires` hold."""
    budget = options.single_pass_budget_mb * 2**20
    choices: dict = {}
    linear = [pg for pg in pgs if pg in shapes]
    for pg in linear:
        costs = linear_costs(shapes[pg], budget, probes=options.probes)
        forced = options.forced_strategy(pg.name)
        record = None if forced == "auto" else get_strategy(forced)
        if record is not None and record.check is not None:
            record.check(pg.name, shapes[pg])
        if record is None or record.exact:  # inexact costs are shown only where the user asked for one
            for k in _inexact():
                costs.pop(k, None)
        if getattr(options, "adaptive", False):  # run-time thresholds: not a candidate, not shown
            for st in strategies():
                if not st.runtime_threshold:
                    costs.pop(st.name, None)
        choices[pg] = SiteChoice(forced, costs, forced=forced != "auto")
    # run-time thresholds (max_grad_norm="adaptive"): only strategies whose ops read the threshold as a tensor
    single = next((st.name for st in strategies() if st.group_clip and st.option and st.exact
                   and (st.runtime_threshold or not getattr(options, "adaptive", False))), None)
    forced_single = [pg for pg in linear if _group_clip(choices[pg].strategy)]
    prefer_single = single is not None and options.strategy == single  # wherever the scope allows (one per group)
    if prefer_single:
        for pg in linear:
            choices[pg].strategy = "auto"
        forced_single = []
    elif len(forced_single) > 1:
        raise OptionsError(
            f"option strategy: {choices[forced_single[0]].strategy!r} was forced for "
            f"{[pg.name for pg in forced_single]}, which share one clipping group; single-pass clipping forms one "
            "site's per-sample products after every other norm of the group, so only one site per group can take it "
            "(use per_layer clipping or force 'direct'/'ghost')")
    conditions = {
        # two_pass has no chunked form: its products must fit the budget at the compiled batch
        "scratch_fits": lambda s: evaluate(s.B * s.M * s.N * s.itemsize, batch_symbol, batch_hint, hints) <= budget,
        # stored products (B M N) take no more memory than the operands (B T (M + N)) kept by direct / ghost /
        # two_pass until the group's factor is known
        "keeps_no_more": lambda s: evaluate(s.M * s.N - s.T * (s.M + s.N), batch_symbol, batch_hint, hints) <= 0,
    }

    def multi_pass(pg):  # what a site that is not the group's single-pass site chooses among
        return tuple(st.name for st in strategies() if st.option and st.exact and not st.group_clip
                     and all(conditions[c](shapes[pg]) for c in st.requires))

    if not forced_single and single is not None:
        # the auto site that single_pass saves most on, if single_pass beats its best alternative
        def saving(pg):  # only "auto" sites: a forced site ("randomized" included) keeps what it was given
            # against the strategies that keep no products: stored is the same work for the group's other sites
            # (the same cost as single_pass at one chunk)
            c = choices[pg].costs
            best = min(evaluate(c[k], batch_symbol, batch_hint, hints) for k in multi_pass(pg)
                       if not get_strategy(k).keeps_products)
            return best - evaluate(c[single], batch_symbol, batch_hint, hints)

        auto = [pg for pg in linear if choices[pg].strategy == "auto"]
        if auto:
            best = max(auto, key=saving)
            if prefer_single or saving(best) > 0:
                choices[best].strategy = single
    for pg in linear:
        ch = choices[pg]
        if ch.strategy == "auto":
            ch.strategy = choose_linear(ch.costs, multi_pass(pg), batch_symbol, batch_hint, hints)
        ch.chunked = not conditions["scratch_fits"](shapes[pg])
        # randomized: the same estimate from stored products wherever stored may keep them. It is never more work:
        # the clipped sum within the budget forms the same products anyway (randomized_vendor_sum), and there
        # M N <= T (M + N), so probing the products costs at most what probing the rows does
        ch.stored_products = (get_strategy(ch.strategy).stored is not None and not ch.chunked
                              and conditions["keeps_no_more"](shapes[pg]))
    for pg in pgs:
        if pg not in choices:
            choices[pg] = combined_choice(pg, options, batch_symbol, batch_hint, hints) or SiteChoice(strategy(pg), {})
    return choices


def combined_choice(pg, options, batch_symbol, batch_hint: int, hints: dict | None = None):
    """A parameter of several contributions that a site kind takes as one site (SiteKind.combine: a table tied to
    the LM head): the SiteChoice of the cheapest of that kind's strategies and materialize at the compiled sizes,
    materialize only where its (B, *p.shape) per-sample gradients fit the scratch budget (single_pass_budget_mb).
    Unless materialize wins, pg's contributions become the kind's one site. None where no kind combines them."""
    if pg.fused or len(pg.contributions) < 2:
        return None
    from .sites import kinds

    budget = options.single_pass_budget_mb * 2**20
    for kind in reversed(kinds()):
        if kind.combine is None:
            continue
        found = kind.combine(pg, batch_symbol if batch_symbol is not None else batch_hint, budget, DEVICE)
        if found is None:
            continue
        contribution, costs, scratch = found
        allowed = [k for k in costs
                   if k != "materialize" or evaluate(scratch, batch_symbol, batch_hint, hints) <= budget]
        best = choose_linear(costs, tuple(allowed), batch_symbol, batch_hint, hints)
        if best != "materialize":
            pg.contributions = [contribution]
        return SiteChoice(best, costs)
    return None


def _group_clip(name: str) -> bool:
    record = find_strategy(name)
    return record is not None and record.group_clip is not None


def check_randomizable(name: str, T) -> None:
    """A forced "randomized" linear site must have more than one row per sample. A symbolic T is >= 2 (Dynamo
    specializes sizes 0 and 1, so a call with T = 1 compiles its own graph, where this check sees T = 1)."""
    if sympy.sympify(T) == 1:
        raise OptionsError(
            f"option strategy: 'randomized' was forced for `{name}`, a linear site with one row per sample (T = 1, "
            "e.g. a layer on 2-D inputs): its exact norm ||a_i||^2 ||b_i||^2 costs less than the probes and no "
            "privacy, so it is not randomized. Leave it out of the 'randomized' globs (for example "
            "strategy={'blocks.*': 'randomized'})")


def check_forced_globs(options, names: list) -> None:
    """A forced-strategy glob that matches no trainable parameter is a typo: say so."""
    if isinstance(options.strategy, str):
        return
    import fnmatch

    for glob, _ in options.strategy:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise OptionsError(f"option strategy: glob {glob!r} matches no trainable parameter of the compiled "
                               f"graph (parameters: {names[:8]}{' ...' if len(names) > 8 else ''})")


def strategy(pg) -> str:
    return f"fused-{pg.contributions[0].site.kind}" if pg.fused else "materialize"


def pattern(pg) -> str:
    parts = []
    for c in pg.contributions:
        op = c.site.node.args[0] if c.site.node.target is operator.getitem else c.site.node
        name = op_name(op.target)
        chain = [op_name(s.node.target).split(".")[0] for s in c.chain]
        tail = ("->" + "->".join(dict.fromkeys(chain))) if chain else ""
        parts.append(f"{c.site.kind}({name}){tail}")
    return " + ".join(parts)


def per_sample_us(costs: dict, batch_symbol, batch_hint: int, hints: dict | None = None) -> dict:
    """{strategy: predicted microseconds per sample} at the compiled shapes."""
    return {k: 1e6 * evaluate(v, batch_symbol, batch_hint, hints) / max(batch_hint, 1) for k, v in costs.items()}


def plan_rows(params, ctx, empty: bool = False, choices: dict | None = None, batch_symbol=None,
              batch_hint: int = 1, randomized: set | None = None, hints: dict | None = None) -> list:
    """One row per parameter. randomized: ids of the parameters a batch-size-1 graph estimates with probes."""
    rows = []
    for info, pg in params:
        ch = (choices or {}).get(pg)
        if empty:
            chosen = "zero"
        elif randomized and pg in randomized:
            chosen = "randomized"
        elif ch and ch.stored_products:
            chosen = get_strategy(ch.strategy).stored
        else:
            chosen = ch.strategy if ch else strategy(pg)
        rows.append({
            "parameter": info.name,
            "group": info.group,
            "threshold": ctx.thresholds.get(info.group, "adaptive"),
            "pattern": "-" if empty else pattern(pg),
            "strategy": chosen,
            "chunked": bool(ch and _group_clip(ch.strategy) and ch.chunked),
            "forced": bool(ch and ch.forced) or chosen in _inexact(),
            "cost_us_per_sample": {} if (empty or not ch) else per_sample_us(ch.costs, batch_symbol, batch_hint, hints),
            # as sympy prints them: simplify() took ~0.4 s a parameter, most of a 22-layer model's compile
            "cost_expr": {} if (empty or not ch) else {k: str(v) for k, v in ch.costs.items()},
            "shape": tuple(pg.placeholder.meta["val"].shape),
        })
    return rows
