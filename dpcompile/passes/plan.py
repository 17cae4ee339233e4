"""The planner: a strategy per parameter, chosen from sympy cost expressions, and the rows `explain` prints.

Strategies:
  direct        linear weight: a per-sample GEMM with the norm in its epilogue, then the clipped-sum GEMM (2 W)
  ghost         linear weight: Gram products of the T rows on chip for the norm (B T^2 (M+N)), then the clipped sum
  single_pass   linear weight, one site per clipping group: each per-sample product is formed once by the vendor
                batched GEMM into a scratch buffer (chunks of samples within a memory budget), its norm taken from
                the stored values, then reduced with the clip factors (W + 3 B M N bytes of traffic)
  stored        linear weight, any number per group, where the scratch of one site fits the budget and the
                products are no larger than the operands the other multi-pass strategies keep for their clipped sum
                (M N <= T (M + N)): formed once by the vendor GEMM, normed, and kept until the group's clip factor
                is known, then reduced (W + 3 B M N bytes; a flat group's sites keep them until the backward ends)
  two_pass      linear weight, where the scratch of one site fits the budget: the products formed by the vendor
                GEMM for the norms, dropped, and formed again for the clipped sum (2 W + 6 B M N bytes)
  randomized    linear weight, only where the user forces it (it changes the privacy analysis): the norm estimated
                with k Gaussian probes, 2 B T k (M+N) flops at fp32 accuracy on tensor cores
                (docs/randomized.md), then the clipped sum (two_pass's where the products fit the budget). Never
                chosen automatically, never single-pass, refused on T = 1 sites (the exact norm is cheaper there and
                private for free). Wherever stored's conditions hold (long T: M N <= T (M + N)), the same
                estimate with the same probes is taken from the products instead (randomized_stored: formed once,
                kept, probed at 2 B M N k flops, reduced): never more work, the estimator's law (hence the
                accounting) unchanged, and it estimates the norm of exactly the stored values that are summed
  fused-rows / fused-embedding   bias, norm affine and elementwise parameters / embedding tables: own ops
  materialize   per-sample gradients formed (B x numel), then norm and sum: several uses of one parameter
                (tied weights), bmm and conv sites, scatters after other ops, and B == 1 graphs
  zero          empty batch: the clipped sum is zero

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


def linear_costs(s: LinearShape, budget_bytes: float, dev: DeviceModel = DEVICE, probes: int = 32) -> dict:
    """Seconds for one linear weight site's norm + clipped sum under each strategy (sympy expressions in B).
    "randomized" and "randomized_stored" (k = probes products per sample) are costed so that explain can show them;
    plan_group only ever takes them where the user forced "randomized"."""
    B, T, M, N, e = s.B, s.T, s.M, s.N, s.itemsize
    flops = dev.flops_16 if e <= 2 else dev.flops_32
    gemm = 2 * B * T * M * N / flops  # one weight-gradient-shaped GEMM of ours
    bmm = 2 * B * T * M * N / (dev.flops_vendor if e <= 2 else dev.flops_32)  # the same products, vendor GEMM
    tiles = B * M * N * e / dev.bandwidth  # one pass over the per-sample products
    read = B * T * (M + N) * e / dev.bandwidth  # one pass over the operands
    one_pass = bmm + read + 3 * tiles  # products formed once, written, read for the norm and for the sum
    chunks = sympy.ceiling(B * M * N * e / budget_bytes)
    # one chunk: a triton_op Inductor inlines; several: a Python loop on every step (host time, measured ~0.3 ms)
    chunk_host = sympy.Piecewise((0, chunks <= 1), (dev.chunk_loop * chunks, True))
    return {
        "direct": 2 * gemm + 2 * read + 3 * dev.launch,
        "ghost": B * T * T * (M + N) / flops + gemm + 2 * read + 3 * dev.launch,
        "single_pass": one_pass + chunks * 6 * dev.launch + chunk_host,
        "stored": one_pass + 6 * dev.launch,  # single_pass's kernels at one chunk, the factor computed apart
        "two_pass": 2 * bmm + 2 * read + 6 * tiles + 4 * dev.launch,
        # Z = a_i V and b_i^T Z at fp32 accuracy (T k (M + N) multiply-adds per sample), Z written and read back
        # (B T k fp32), then the clipped sum: two_pass's (vendor GEMM, products reduced) where the products fit
        # the budget, else our clipped-sum GEMM
        "randomized": 2 * B * T * probes * (M + N) / dev.flops_probe + 2 * B * T * probes * 4 / dev.bandwidth
        + sympy.Piecewise((bmm + read + 3 * tiles, B * M * N * e <= budget_bytes), (gemm + read, True))
        + 5 * dev.launch,
        # stored's products, probed (M N k multiply-adds per sample) instead of normed
        "randomized_stored": one_pass + 2 * B * M * N * probes / dev.flops_probe + 6 * dev.launch,
    }


RANDOMIZED_COSTS = ("randomized", "randomized_stored")


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
        """The strategy as the rewrite applies it: over the budget, single_pass runs chunked; within it, a
        randomized site's clipped sum forms the products with the vendor GEMM and reduces them (two_pass's sum)."""
        if self.stored_products:
            return "randomized_stored"
        if self.chunked:
            return "single_pass_chunked" if self.strategy == "single_pass" else self.strategy
        return "randomized_vendor_sum" if self.strategy == "randomized" else self.strategy


def plan_group(pgs: list, shapes: dict, options, batch_symbol, batch_hint: int, hints: dict | None = None) -> dict:
    """{id(pg): SiteChoice} for one clipping group. `shapes` maps id(pg) -> LinearShape for fused linear sites;
    `hints` gives the value of every other symbol in their sizes (the sequence length) at the compiled call.

    single_pass needs the group's clip factor before the site's sum, so at most one site per group takes it (the
    one it saves most on); the others choose between direct and ghost."""
    budget = options.single_pass_budget_mb * 2**20
    choices: dict = {}
    linear = [pg for pg in pgs if id(pg) in shapes]
    for pg in linear:
        costs = linear_costs(shapes[id(pg)], budget, probes=options.probes)
        forced = options.forced_strategy(pg.name)
        if forced == "randomized":
            check_randomizable(pg.name, shapes[id(pg)].T)
        else:  # the randomized costs are shown only where the user asked for it: auto never weighs them
            for k in RANDOMIZED_COSTS:
                costs.pop(k)
        choices[id(pg)] = SiteChoice(forced, costs, forced=forced != "auto")
    forced_single = [pg for pg in linear if choices[id(pg)].strategy == "single_pass"]
    prefer_single = options.strategy == "single_pass"  # the global form: wherever the scope allows (one per group)
    if prefer_single:
        for pg in linear:
            choices[id(pg)].strategy = "auto"
        forced_single = []
    elif len(forced_single) > 1:
        raise OptionsError(
            f"option strategy: 'single_pass' was forced for {[pg.name for pg in forced_single]}, which share one "
            "clipping group; single-pass clipping forms one site's per-sample products after every other norm of "
            "the group, so only one site per group can take it (use per_layer clipping or force 'direct'/'ghost')")
    def scratch_fits(pg):  # two_pass has no chunked form: its products must fit the budget at the compiled batch
        s = shapes[id(pg)]
        return evaluate(s.B * s.M * s.N * s.itemsize, batch_symbol, batch_hint, hints) <= budget

    def keeps_no_more(pg):  # stored products (B M N) take no more memory than the operands (B T (M + N)) kept
        s = shapes[id(pg)]  # by direct / ghost / two_pass until the group's factor is known
        return evaluate(s.M * s.N - s.T * (s.M + s.N), batch_symbol, batch_hint, hints) <= 0

    def multi_pass(pg):  # what a site that is not the group's single-pass site chooses among
        if not scratch_fits(pg):
            return ("direct", "ghost")
        return ("direct", "ghost", "stored", "two_pass") if keeps_no_more(pg) else ("direct", "ghost", "two_pass")

    if not forced_single:
        # the auto site that single_pass saves most on, if single_pass beats its best alternative
        def saving(pg):  # only "auto" sites: a forced site ("randomized" included) keeps what it was given
            # against the strategies that keep no products: stored is the same work for the group's other sites
            # (the same cost as single_pass at one chunk)
            c = choices[id(pg)].costs
            best = min(evaluate(c[k], batch_symbol, batch_hint, hints) for k in multi_pass(pg) if k != "stored")
            return best - evaluate(c["single_pass"], batch_symbol, batch_hint, hints)

        auto = [pg for pg in linear if choices[id(pg)].strategy == "auto"]
        if auto:
            best = max(auto, key=saving)
            if prefer_single or saving(best) > 0:
                choices[id(best)].strategy = "single_pass"
    for pg in linear:
        ch = choices[id(pg)]
        if ch.strategy == "auto":
            ch.strategy = choose_linear(ch.costs, multi_pass(pg), batch_symbol, batch_hint, hints)
        ch.chunked = not scratch_fits(pg)
        # randomized: the same estimate from stored products wherever stored may keep them. It is never more work:
        # the clipped sum within the budget forms the same products anyway (randomized_vendor_sum), and there
        # M N <= T (M + N), so probing the products costs at most what probing the rows does
        ch.stored_products = ch.strategy == "randomized" and not ch.chunked and keeps_no_more(pg)
    for pg in pgs:
        if id(pg) not in choices:
            choices[id(pg)] = SiteChoice(strategy(pg), {})
    return choices


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
        name = getattr(op.target, "__name__", str(op.target))
        chain = [getattr(s.node.target, "__name__", str(s.node.target)).split(".")[0] for s in c.chain]
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
        ch = (choices or {}).get(id(pg))
        if empty:
            chosen = "zero"
        elif randomized and id(pg) in randomized:
            chosen = "randomized"
        elif ch and ch.stored_products:
            chosen = "randomized_stored"
        else:
            chosen = ch.strategy if ch else strategy(pg)
        rows.append({
            "parameter": info.name,
            "group": info.group,
            "threshold": ctx.thresholds[info.group],
            "pattern": "-" if empty else pattern(pg),
            "strategy": chosen,
            "chunked": bool(ch and ch.strategy == "single_pass" and ch.chunked),
            "forced": bool(ch and ch.forced) or chosen in RANDOMIZED_COSTS,
            "cost_us_per_sample": {} if (empty or not ch) else per_sample_us(ch.costs, batch_symbol, batch_hint, hints),
            # as sympy prints them: simplify() took ~0.4 s a parameter, most of a 22-layer model's compile
            "cost_expr": {} if (empty or not ch) else {k: str(v) for k, v in ch.costs.items()},
            "shape": tuple(pg.placeholder.meta["val"].shape),
        })
    return rows
