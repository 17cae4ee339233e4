"""The built-in strategies, one record each (dpcompile/strategy_registry.py says what a record holds).

  direct        linear weight: a per-sample GEMM with the norm in its epilogue, then the clipped-sum GEMM (2 W)
  ghost         linear weight: Gram products of the T rows on chip for the norm (B T^2 (M+N)), then the clipped sum
  single_pass   linear weight, one site per clipping group: each per-sample product is formed once by the vendor
                batched GEMM into a scratch buffer (chunks of samples within a memory budget), its norm taken from
                the stored values, then reduced with the clip factors (W + 3 B M N bytes of traffic). In a group
                with a bias or norm weight it runs as stored (its factor_apart form: the same kernels), so that
                the rows sites' norms, the group's factor and their sums take one launch (ops.rows_group_clipped_sum)
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
  tied_embedding_ghost / tied_embedding_direct   a table tied to the LM head, as one site (passes/sites/
                tied_embedding.py: its costs there, chosen by plan.combined_choice against materialize)
  materialize   per-sample gradients formed (B x numel), then norm and sum: several uses of one parameter
                (tied weights where materializing is cheaper and fits the scratch budget), bmm and conv sites,
                scatters after other ops, and B == 1 graphs
  zero          empty batch: the clipped sum is zero

  single_pass_chunked / randomized_vendor_sum   internal forms the rewrite runs (Strategy.chunked / within_budget)
"""
from __future__ import annotations

from types import SimpleNamespace

import sympy

from ..codegen import ops
from ..strategy_registry import Strategy, register_strategy
from .plan import DeviceModel, LinearShape, check_randomizable


def linear_terms(s: LinearShape, budget_bytes: float, dev: DeviceModel) -> SimpleNamespace:
    """The seconds the linear costs are built from (sympy expressions in the graph's sizes)."""
    B, T, M, N, e = s.B, s.T, s.M, s.N, s.itemsize
    t = SimpleNamespace(flops=dev.flops_16 if e <= 2 else dev.flops_32)
    t.gemm = 2 * B * T * M * N / t.flops  # one weight-gradient-shaped GEMM of ours
    t.bmm = 2 * B * T * M * N / (dev.flops_vendor if e <= 2 else dev.flops_32)  # the same products, vendor GEMM
    t.tiles = B * M * N * e / dev.bandwidth  # one pass over the per-sample products
    t.read = B * T * (M + N) * e / dev.bandwidth  # one pass over the operands
    t.one_pass = t.bmm + t.read + 3 * t.tiles  # products formed once, written, read for the norm and for the sum
    t.chunks = sympy.ceiling(B * M * N * e / budget_bytes)
    t.fits = B * M * N * e <= budget_bytes
    return t


def _costed(fn):
    """fn(terms, shape, dev, probes) as a Strategy.cost (shape, budget_bytes, dev, probes)."""
    return lambda s, budget, dev, probes: fn(linear_terms(s, budget, dev), s, dev, probes)


def _plain(norm_op):
    return lambda ins, pg, env, randomized: (norm_op(*ins), ins)


def _kept(norm_op, by_rows: bool = False):
    """A norm op that returns (the products, the squared norms of their rows (B, M)): the clipped sum reads the
    kept products; the norms are the rows' sum, or (by_rows, Strategy.norm_rows) the rows' parts themselves."""
    def norm(ins, pg, env, randomized=None):
        tiles, rows = norm_op(*ins)
        return (rows if by_rows else rows.sum(1)), (tiles,)
    return norm


def _sum(op):
    return lambda ins, coef: op(*ins, coef)


def _randomized_norm(ins, pg, env, randomized):
    return randomized.norm(pg, *ins, env), ins


def _randomized_stored_norm(ins, pg, env, randomized):
    tiles = ops.linear_products(*ins)
    return randomized.estimate(pg, tiles, env), (tiles,)


def _probe_cost(t, s, dev, probes):
    """Z = a_i V and b_i^T Z at fp32 accuracy (T k (M + N) multiply-adds per sample), Z written and read back
    (B T k fp32), then the clipped sum: two_pass's (vendor GEMM, products reduced) where the products fit the
    budget, else our clipped-sum GEMM."""
    B, T, M, N = s.B, s.T, s.M, s.N
    return (2 * B * T * probes * (M + N) / dev.flops_probe + 2 * B * T * probes * 4 / dev.bandwidth
            + sympy.Piecewise((t.bmm + t.read + 3 * t.tiles, t.fits), (t.gemm + t.read, True)) + 5 * dev.launch)


def _chunk_host(t, dev):
    # one chunk: a triton_op Inductor inlines; several: a Python loop on every step (host time, measured ~0.3 ms)
    return sympy.Piecewise((0, t.chunks <= 1), (dev.chunk_loop * t.chunks, True))


def _single_pass(a, b, rest, sq_scale, threshold, clip_fn, mean, budget_bytes):
    return ops.linear_single_pass(a, b, rest, sq_scale, threshold, clip_fn, mean)


BUILTIN = (
    Strategy("direct", cost=_costed(lambda t, s, dev, k: 2 * t.gemm + 2 * t.read + 3 * dev.launch),
             norm=_plain(ops.linear_norm), clipped_sum=_sum(ops.linear_clipped_sum)),
    Strategy("ghost", cost=_costed(lambda t, s, dev, k: s.B * s.T * s.T * (s.M + s.N) / t.flops + t.gemm
                                   + 2 * t.read + 3 * dev.launch),
             norm=_plain(ops.linear_ghost_norm), clipped_sum=_sum(ops.linear_clipped_sum)),
    Strategy("single_pass", cost=_costed(lambda t, s, dev, k: t.one_pass + t.chunks * 6 * dev.launch
                                         + _chunk_host(t, dev)),
             group_clip=_single_pass, keeps_products=True, chunked="single_pass_chunked", runtime_threshold=False,
             factor_apart="stored"),
    Strategy("single_pass_chunked", option=False, group_clip=ops.linear_single_pass_chunked, keeps_products=True,
             runtime_threshold=False),
    # single_pass's kernels at one chunk, the factor computed apart
    Strategy("stored", cost=_costed(lambda t, s, dev, k: t.one_pass + 6 * dev.launch),
             norm=_kept(ops.linear_tiles), norm_rows=_kept(ops.linear_tiles, by_rows=True),
             clipped_sum=_sum(ops.tiles_clipped_sum),
             requires=("scratch_fits", "keeps_no_more"), keeps_products=True),
    Strategy("two_pass", cost=_costed(lambda t, s, dev, k: 2 * t.bmm + 2 * t.read + 6 * t.tiles + 4 * dev.launch),
             norm=_plain(ops.linear_tile_norm), clipped_sum=_sum(ops.linear_tile_clipped_sum),
             requires=("scratch_fits",)),
    Strategy("randomized", exact=False, accounting="randomized", cost=_costed(_probe_cost),
             norm=_randomized_norm, clipped_sum=_sum(ops.linear_clipped_sum),
             within_budget="randomized_vendor_sum", stored="randomized_stored",
             check=lambda name, shape: check_randomizable(name, shape.T)),
    Strategy("randomized_vendor_sum", exact=False, accounting="randomized", option=False,
             norm=_randomized_norm, clipped_sum=_sum(ops.linear_tile_clipped_sum)),
    # stored's products, probed (M N k multiply-adds per sample) instead of normed
    Strategy("randomized_stored", exact=False, accounting="randomized", option=False,
             cost=_costed(lambda t, s, dev, k: t.one_pass + 2 * s.B * s.M * s.N * k / dev.flops_probe
                          + 6 * dev.launch),
             norm=_randomized_stored_norm, clipped_sum=_sum(ops.tiles_clipped_sum)),
    Strategy("materialize", kind=None, norm=lambda ps, pg, env, randomized: (ops.persample_norm(ps), ps),
             clipped_sum=ops.persample_clipped_sum),
)

for _s in BUILTIN:
    register_strategy(_s, replace=True)
