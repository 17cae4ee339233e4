"""Linear weight sites, s_i = a_i^T b_i with a (B, T, M), b (B, T, N):

  per_sample_sq_norms   ||s_i||_F^2 for every sample, taken from the fp32 accumulator of each output tile (the
                        per-sample gradient never leaves the chip); partial sums per (sample, tile) are reduced
                        afterwards in a fixed order, so the result does not depend on the order of atomics.
  clipped_sum           sum_i coef_i s_i: each tile accumulates one sample's product in fp32, scales it by coef_i
                        in fp32 at the sample boundary, and adds it to the running fp32 sum.

Masked edges for any shape; strided (B, T, d) views (time-major layouts are plain strides); bf16/fp16 operands go
to the tensor cores with fp32 accumulation, fp32 operands use IEEE fp32 products (no TF32 rounding in norms).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                  BLOCK_T: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rt0 = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + rt0
        a = tl.load(a_ptr + sample * sa_b + rt[:, None] * sa_t + rm[None, :] * sa_m,
                    mask=(rt[:, None] < T) & (rm[None, :] < M), other=0.0)
        b = tl.load(b_ptr + sample * sb_b + rt[:, None] * sb_t + rn[None, :] * sb_n,
                    mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    return acc


@triton.jit
def _norm_kernel(a_ptr, b_ptr, partial_ptr, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, tiles_n, tiles,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    sample = tl.program_id(0)
    tile = tl.program_id(1)
    rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                        BLOCK_T, IEEE, BLOCK_M, BLOCK_N)
    tl.store(partial_ptr + sample * tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _clipped_sum_kernel(a_ptr, b_ptr, coef_ptr, out_ptr, NB, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n,
                        so_m, so_n, tiles_n,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sample in range(0, NB):
        acc = _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                            BLOCK_T, IEEE, BLOCK_M, BLOCK_N)
        total += tl.load(coef_ptr + sample).to(tl.float32) * acc
    tl.store(out_ptr + rm[:, None] * so_m + rn[None, :] * so_n, total.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(a: torch.Tensor, b: torch.Tensor, block: int | None):
    if block is not None:
        return block, block, block
    # 64x64 output tiles, 64 rows of T per step: fits every Hopper/Ampere config, good enough until autotuning
    return 64, 64, 64 if a.element_size() <= 2 else 32


def _common(a: torch.Tensor, b: torch.Tensor):
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    if a.dtype == torch.float64:
        raise TypeError("Triton linear kernels take fp32/fp16/bf16 operands; fp64 uses the PyTorch reference")
    return a, b, a.dtype == torch.float32


def per_sample_sq_norms(a: torch.Tensor, b: torch.Tensor, block: int | None = None, launch=None) -> torch.Tensor:
    """launch: torch.library.wrap_triton inside a triton_op (Inductor then emits the launch itself)."""
    launch = launch or (lambda k: k)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    bm, bn, bt = _blocks(a, b, block)
    tiles_n = triton.cdiv(N, bn)
    tiles = triton.cdiv(M, bm) * tiles_n
    partial = torch.empty((B, tiles), device=a.device, dtype=torch.float32)
    if B > 0 and tiles > 0:
        launch(_norm_kernel)[(B, tiles)](a, b, partial, T, M, N, *a.stride(), *b.stride(), tiles_n, tiles,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt, IEEE=ieee)
    return partial.sum(1)


def clipped_sum(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, block: int | None = None,
                launch=None) -> torch.Tensor:
    launch = launch or (lambda k: k)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    bm, bn, bt = _blocks(a, b, block)
    tiles_n = triton.cdiv(N, bn)
    tiles = triton.cdiv(M, bm) * tiles_n
    if tiles > 0:
        coef = coef.to(torch.float32).contiguous()
        launch(_clipped_sum_kernel)[(tiles,)](a, b, coef, out, B, T, M, N, *a.stride(), *b.stride(), *out.stride(),
                                      tiles_n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt, IEEE=ieee)
    return out
