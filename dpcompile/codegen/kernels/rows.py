"""A clipping group's rows sites (biases, norm weights) and its clip factor in one launch.

  group_clip_rows   from the per-sample row sums c_k (B, P_k) of one or two rows sites and the squared norms of the
                    group's other sites (rest, (B, K) parts summed here: a linear weight's row norms, or K = 1):
                    the group's factors coef_i (clipping.group_clip_factors of rest_i + sum_k ||c_k,i||^2) and
                    each site's clipped sum sum_i coef_i c_k,i.

Each program owns BLOCK_P columns of one rows site's sum. The factor needs every column of every sample, so each
program first reads the whole (B, P_0 + P_1) row sums and the norm parts to form the samples' factors (a few KB,
from L2), then accumulates its columns over the samples: no atomics, and the result does not depend on
scheduling. Program 0 also stores the factors, which the group's other sites' clipped sums read. This replaces a
norm kernel per rows site, a factor kernel and a clipped-sum kernel per group that Inductor generated
(benchmarks/NOTES.md, entries 34 and 35). A stored weight's products are not summed here: programs owning product
columns had each to form their samples' factors from the row sums and norm parts first, as much traffic as their
own products and a chain of dependent loads, which made the launch 2.3 ms a step on gpt2-small where the scaled
reduction reads the products at memory speed (NOTES 37). The factor's formula mirrors clipping.py (its home),
with IEEE division and square root; tests/test_kernels_rows.py holds the kernel to the reference in
codegen/ops.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...options import AUTO_GAMMA, CLIP_EPS

BLOCK_B = 16
SCAN_P = 256  # columns per step of the norm scan (fewer dependent steps before a program can start its sums)
MAX_BLOCK_P = 512  # columns a program owns at most (its (BLOCK_B, BLOCK_P) tile stays in registers)
TARGET_PROGRAMS = 16  # fewer, wider programs when the sites are narrow: each one re-reads the whole row sums


@triton.jit
def _sq_rows(x_ptr, sx_b, P, rb, mb, SCAN: tl.constexpr):
    """sum_p x[b, p]^2 for the samples rb."""
    rp = tl.arange(0, SCAN)
    acc = tl.zeros((rb.shape[0],), dtype=tl.float32)
    for p0 in range(0, P, SCAN):
        cols = p0 + rp
        x = tl.load(x_ptr + rb[:, None] * sx_b + cols[None, :], mask=mb[:, None] & (cols[None, :] < P), other=0.0)
        acc += tl.sum(x * x, axis=1)
    return acc


@triton.jit
def _sum_rows(x_ptr, sx_b, K, rb, mb, SCAN: tl.constexpr):
    """sum_k x[b, k] for the samples rb."""
    rk = tl.arange(0, SCAN)
    acc = tl.zeros((rb.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, SCAN):
        cols = k0 + rk
        acc += tl.sum(tl.load(x_ptr + rb[:, None] * sx_b + cols[None, :], mask=mb[:, None] & (cols[None, :] < K),
                              other=0.0), axis=1)
    return acc


@triton.jit
def _group_factors(x0_ptr, x1_ptr, rest_ptr, P0, P1, K, s0_b, s1_b, sr_b, rb, mb, batch, threshold,
                   HAS_X1: tl.constexpr, HAS_REST: tl.constexpr, ABADI: tl.constexpr, MEAN: tl.constexpr,
                   EPS: tl.constexpr, SCAN: tl.constexpr):
    """The clip factors of the samples rb: clipping.group_clip_factors of the rows sites' squared norms + rest."""
    sq = _sq_rows(x0_ptr, s0_b, P0, rb, mb, SCAN)
    if HAS_X1:
        sq += _sq_rows(x1_ptr, s1_b, P1, rb, mb, SCAN)
    if HAS_REST:
        sq += _sum_rows(rest_ptr, sr_b, K, rb, mb, SCAN)
    # clipping.group_clip_factors: under "mean" the norms are of B g_i, and the factor carries B back
    if MEAN:
        sq = sq * (batch * batch)
    norms = tl.sqrt_rn(tl.maximum(sq, 0.0))
    thr = (tl.zeros_like(norms) + threshold).to(tl.float32)  # fp64 under Inductor, a float in the interpreter
    coef = tl.div_rn(thr, norms + EPS)
    if ABADI:
        coef = tl.minimum(coef, 1.0)
    if MEAN:
        coef = coef * batch
    return coef


@triton.jit
def _group_clip_rows_kernel(x0_ptr, x1_ptr, rest_ptr, out0_ptr, out1_ptr, coef_ptr, B, P0, P1, K, s0_b, s1_b, sr_b,
                            threshold, HAS_X1: tl.constexpr, HAS_REST: tl.constexpr, ABADI: tl.constexpr,
                            MEAN: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
                            SCAN: tl.constexpr):
    pid = tl.program_id(0)
    # the batch size as the factor's formula reads it, in fp32 whatever B's type: an i64 under Inductor (a symbolic
    # size; B * 1.0 would be fp64 there), a constexpr where Triton specializes B = 1, an int in the interpreter (a
    # float argument computed on the host would specialize the symbolic batch)
    batch = tl.zeros((), dtype=tl.float32) + B
    n0 = tl.cdiv(P0, BLOCK_P)
    second = pid >= n0  # this program's columns are site 1's
    col0 = (pid - n0 * second.to(tl.int32)) * BLOCK_P
    rp = col0 + tl.arange(0, BLOCK_P)
    P_own = tl.where(second, P1, P0)
    mp = rp < P_own
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < B
        coef = _group_factors(x0_ptr, x1_ptr, rest_ptr, P0, P1, K, s0_b, s1_b, sr_b, rb, mb, batch, threshold,
                              HAS_X1, HAS_REST, ABADI, MEAN, EPS, SCAN)
        if pid == 0:
            tl.store(coef_ptr + rb, coef, mask=mb)
        if second:
            x = tl.load(x1_ptr + rb[:, None] * s1_b + rp[None, :], mask=mb[:, None] & mp[None, :], other=0.0)
        else:
            x = tl.load(x0_ptr + rb[:, None] * s0_b + rp[None, :], mask=mb[:, None] & mp[None, :], other=0.0)
        acc += tl.sum(coef[:, None] * x, axis=0)
    # out1 is stored through only where its site exists (a constexpr branch): what Inductor's analysis of the kernel
    # takes as written, and clones apart, is then exactly the outputs, and an absent site's pointer can be any
    # tensor (a written one passed twice came back as an unwritten clone, tests/test_kernels_rows.py)
    if HAS_X1:
        if second:
            tl.store(out1_ptr + rp, acc, mask=mp)
        else:
            tl.store(out0_ptr + rp, acc, mask=mp)
    else:
        tl.store(out0_ptr + rp, acc, mask=mp)


def _block_p(P0: int, P1: int) -> int:
    """Columns per program: wide enough that about TARGET_PROGRAMS programs cover the sites, within the registers."""
    per = triton.cdiv(P0 + P1, TARGET_PROGRAMS)
    return max(SCAN_P, min(MAX_BLOCK_P, triton.next_power_of_2(max(per, 1))))


def group_clip_rows(xs: list, rest_sq: Optional[torch.Tensor], threshold: float, clip_fn: str, mean: bool,
                    launch=None) -> list:
    """[coef (B,), sum_i coef_i xs[0]_i (P_0,), (sum for xs[1])]: fp32 row sums (B, P_k) with unit column stride,
    one or two of them; rest_sq: the group's other squared norms in fp32, (B,) or (B, K) parts with unit column
    stride, summed here."""
    launch = launch or (lambda k: k)
    if not 1 <= len(xs) <= 2:
        raise ValueError(f"group_clip_rows takes one or two sites' row sums, got {len(xs)}")
    x0, x1 = xs[0], (xs[1] if len(xs) > 1 else xs[0])
    B, P0 = x0.shape
    P1 = xs[1].shape[1] if len(xs) > 1 else 0
    coef = torch.empty((B,), device=x0.device, dtype=torch.float32)
    outs = [torch.empty((x.shape[1],), device=x.device, dtype=torch.float32) for x in xs]
    # every pointer the kernel stores through gets its own tensor: under Inductor the launch is functionalized, each
    # written argument cloned apart, and an output passed twice came back as the clone the kernel never wrote. An
    # absent site's pointers are never stored through (constexpr branches) nor read, so x0 stands in for them: an
    # empty tensor each was an allocation a step that the partitioner moved into the forward and saved for the
    # backward (NOTES 36; tests/test_kernels_rows.py)
    out1 = outs[1] if len(xs) > 1 else x0
    block_p = _block_p(P0, P1)
    programs = triton.cdiv(P0, block_p) + triton.cdiv(P1, block_p)
    if rest_sq is not None and rest_sq.dim() == 1:
        rest_sq = rest_sq.unsqueeze(1)
    rest = rest_sq if rest_sq is not None else x0  # read only with HAS_REST
    if programs > 0:
        launch(_group_clip_rows_kernel)[(programs,)](
            x0, x1, rest, outs[0], out1, coef, B, P0, P1, rest.shape[1] if rest_sq is not None else 0,
            x0.stride(0), x1.stride(0), rest.stride(0) if rest_sq is not None else 0, float(threshold),
            HAS_X1=len(xs) > 1, HAS_REST=rest_sq is not None, ABADI=clip_fn == "abadi", MEAN=bool(mean),
            EPS=CLIP_EPS if clip_fn == "abadi" else AUTO_GAMMA, BLOCK_B=BLOCK_B, BLOCK_P=block_p, SCAN=SCAN_P)
    return [coef, *outs]
