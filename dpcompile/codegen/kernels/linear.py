"""Linear weight sites, s_i = a_i^T b_i with a (B, T, M), b (B, T, N). Four kernels, one per strategy step:

  per_sample_sq_norms   direct: ||s_i||_F^2 from the fp32 accumulator of each output tile (s_i never leaves the chip)
  ghost_sq_norms        ghost:  ||s_i||_F^2 = <a_i a_i^T, b_i b_i^T>, Gram tiles formed on chip over upper-triangular
                        pairs of T-tiles (off-diagonal pairs counted twice); cost T^2 (M + N) instead of T M N
  clipped_sum           sum_i coef_i s_i: each tile accumulates one sample's product in fp32, scales it by coef_i
                        in fp32 at the sample boundary and adds it to the running fp32 sum; samples split over
                        a second grid axis when the output has too few tiles to fill the GPU
  single_pass           per-layer / group clipping: each per-sample tile is formed once, stored to a scratch
                        buffer (data dtype) with the norm of exactly the stored values in the epilogue, then
                        reduced as sum_i coef_i s_i; done in chunks of samples that fit a memory budget

Every norm is written as partial sums per (sample, program) into a buffer that each launch overwrites completely and
that is reduced in a fixed order: no atomics, so norms do not depend on scheduling, and autotuning (which runs each
config on the real buffers) cannot leave stale partial sums behind. Programs are laid out over a fixed grid (128 x
128 reference tiles) whatever tile shape a config uses, so the buffers' shapes do not depend on the config either.
Masked edges for any shape; strided (B, T, d) views (time-major layouts are plain strides); bf16/fp16 operands go
to the tensor cores with fp32 accumulation, fp32 operands use IEEE fp32 products (no TF32 rounding in norms).
Autotune keys: M, N and T rounded up to a power of two (plus the operand dtypes, which Triton adds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sizes import size_hint

REF_TILE = 128  # grid layout unit (see module docstring)
GHOST_MIN_PROGRAMS = 64  # the ghost kernel's programs per sample at T = 1024: idle ones at short T store a zero
REDUCE_BLOCK = 1024  # scaled_reduce_: output elements per program
REDUCE_SAMPLES = 8  # samples' rows per loaded tile (8 x 1024 bf16: 16 B per thread and row at 4 warps)
REDUCE_WARPS = 4


def _gemm_configs():
    # few configs: each costs a compile and a benchmark per shape at the first step (36-layer models have ~6 shapes)
    shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_T": t}, num_warps=w, num_stages=s)
            for m, n, t, w, s in shapes]


def _ghost_configs():
    shapes = [(64, 64, 4, 3), (128, 64, 8, 3)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k}, num_warps=w, num_stages=s) for t, k, w, s in shapes]


@triton.jit
def _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                  BLOCK_T: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rt0 = tl.arange(0, BLOCK_T)
    a_base = a_ptr + tl.cast(sample, tl.int64) * sa_b
    b_base = b_ptr + tl.cast(sample, tl.int64) * sb_b
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + rt0
        a = tl.load(a_base + rt[:, None] * sa_t + rm[None, :] * sa_m,
                    mask=(rt[:, None] < T) & (rm[None, :] < M), other=0.0)
        b = tl.load(b_base + rt[:, None] * sb_t + rn[None, :] * sb_n,
                    mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    return acc


@triton.jit
def _tile_ranges(tile, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of output tile `tile` (row-major over tiles_n tiles per row)."""
    return ((tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M),
            (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def _norm_kernel(a_ptr, b_ptr, partial_ptr, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, P, T_BUCKET,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    sample = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    total = 0.0
    for tile in range(pid, tiles, P):
        rm, rn = _tile_ranges(tile, tiles_n, BLOCK_M, BLOCK_N)
        acc = _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                            BLOCK_T, IEEE, BLOCK_M, BLOCK_N)
        total += tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(partial_ptr + sample * P + pid, total)


@triton.jit
def _gram_tile(x_ptr, sample, rp, rq, T, K, sx_b, sx_t, sx_k,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """x_i[rp] x_i[rq]^T, (BLOCK_T, BLOCK_T) in fp32."""
    g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    base = x_ptr + tl.cast(sample, tl.int64) * sx_b
    rk0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        xp = tl.load(base + rp[:, None] * sx_t + rk[None, :] * sx_k, mask=(rp[:, None] < T) & (rk[None, :] < K),
                     other=0.0)
        xq = tl.load(base + rq[:, None] * sx_t + rk[None, :] * sx_k, mask=(rq[:, None] < T) & (rk[None, :] < K),
                     other=0.0)
        if IEEE:
            g += tl.dot(xp, tl.trans(xq), input_precision="ieee")
        else:
            g += tl.dot(xp, tl.trans(xq))
    return g


@triton.jit
def _ghost_kernel(a_ptr, b_ptr, partial_ptr, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, P, T_BUCKET,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    sample = tl.program_id(0)
    pid = tl.program_id(1)
    tt = tl.cdiv(T, BLOCK_T)
    total = 0.0
    for pair in range(pid, tt * tt, P):
        p = pair // tt
        q = pair % tt
        if p <= q:
            rp = p * BLOCK_T + tl.arange(0, BLOCK_T)
            rq = q * BLOCK_T + tl.arange(0, BLOCK_T)
            ga = _gram_tile(a_ptr, sample, rp, rq, T, M, sa_b, sa_t, sa_m, BLOCK_T, BLOCK_K, IEEE)
            gb = _gram_tile(b_ptr, sample, rp, rq, T, N, sb_b, sb_t, sb_n, BLOCK_T, BLOCK_K, IEEE)
            weight = tl.where(p < q, 2.0, 1.0)
            total += weight * tl.sum(tl.sum(ga * gb, axis=1), axis=0)
    tl.store(partial_ptr + sample * P + pid, total)


@triton.jit
def _clipped_sum_kernel(a_ptr, b_ptr, coef_ptr, out_ptr, NB, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n,
                        so_s, so_m, so_n, P, S, T_BUCKET,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    for tile in range(pid, tiles, P):
        rm, rn = _tile_ranges(tile, tiles_n, BLOCK_M, BLOCK_N)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for sample in range(split, NB, S):
            acc = _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                                BLOCK_T, IEEE, BLOCK_M, BLOCK_N)
            total += tl.load(coef_ptr + sample).to(tl.float32) * acc
        tl.store(out_ptr + split * so_s + rm[:, None] * so_m + rn[None, :] * so_n,
                 total.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _persample_kernel(a_ptr, b_ptr, scratch_ptr, partial_ptr, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, P,
                      T_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      IEEE: tl.constexpr):
    sample = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    out = scratch_ptr + tl.cast(sample, tl.int64) * M * N
    total = 0.0
    for tile in range(pid, tiles, P):
        rm, rn = _tile_ranges(tile, tiles_n, BLOCK_M, BLOCK_N)
        acc = _tile_product(a_ptr, b_ptr, sample, T, M, N, sa_b, sa_t, sa_m, sb_b, sb_t, sb_n, rm, rn,
                            BLOCK_T, IEEE, BLOCK_M, BLOCK_N)
        stored = acc.to(scratch_ptr.dtype.element_ty)
        tl.store(out + rm[:, None] * N + rn[None, :], stored, mask=(rm[:, None] < M) & (rn[None, :] < N))
        kept = stored.to(tl.float32)  # the norm of exactly what the reduction will read
        total += tl.sum(tl.sum(kept * kept, axis=1), axis=0)
    tl.store(partial_ptr + sample * P + pid, total)


@triton.jit
def _scaled_reduce_kernel(scratch_ptr, coef_ptr, acc_ptr, NB, MN, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    # BLOCK_S samples' rows loaded as one (BLOCK_S, BLOCK) tile, that many loads in flight per thread: 28 against
    # 36 us for one row at a time on gpt2-small's qkv products, equal on the large shapes (benchmarks/NOTES.md 35)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    if ACCUMULATE:
        total = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, NB, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        ms = rs < NB
        x = tl.load(scratch_ptr + rs.to(tl.int64)[:, None] * MN + offs[None, :], mask=ms[:, None] & mask[None, :],
                    other=0.0).to(tl.float32)
        c = tl.load(coef_ptr + rs, mask=ms, other=0.0).to(tl.float32)
        total += tl.sum(c[:, None] * x, axis=0)
    tl.store(acc_ptr + offs, total, mask=mask)


# autotuned twins (same JIT functions): every tuned kernel overwrites its outputs completely (see docstring)
_norm_tuned = triton.autotune(_gemm_configs(), key=["M", "N", "T_BUCKET"])(_norm_kernel)
_clipped_sum_tuned = triton.autotune(_gemm_configs(), key=["M", "N", "T_BUCKET"])(_clipped_sum_kernel)
_persample_tuned = triton.autotune(_gemm_configs(), key=["M", "N", "T_BUCKET"])(_persample_kernel)
_ghost_tuned = triton.autotune(_ghost_configs(), key=["M", "N", "T_BUCKET"])(_ghost_kernel)


def _common(a: torch.Tensor, b: torch.Tensor):
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    if a.dtype == torch.float64:
        raise TypeError("Triton linear kernels take fp32/fp16/bf16 operands; fp64 uses the PyTorch reference")
    return a, b, a.dtype == torch.float32


def _pick(plain, tuned, block, launch, **fixed):
    """(kernel, constexpr kwargs): the autotuned kernel, or the plain one with explicit tiles (tests, interpreter)."""
    if block is None and not _interpreting():
        return launch(tuned), {}
    return launch(plain), fixed


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _gemm_blocks(block, a):
    bm = bn = block or 64
    bt = block or (64 if a.element_size() <= 2 else 32)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_T": bt}


def _ref_tiles(M, N) -> int:
    return triton.cdiv(M, REF_TILE) * triton.cdiv(N, REF_TILE)


def _t_bucket(T) -> int:
    """The autotune key's T: a symbolic T (a graph compiled for every length) counts with its hint, without a guard
    (int() would specialize the graph on T): such a graph keeps the configs tuned at its first length."""
    return triton.next_power_of_2(max(size_hint(T), 1))


def _ghost_programs(T) -> int:
    """Programs per sample of the ghost kernel: one per pair of reference row tiles at T's hint, and at least
    GHOST_MIN_PROGRAMS (a graph compiled at a short T also runs long ones). The kernel loops over the pairs with this
    stride, so any count is exact. From the hint, not from T: a symbolic T would put ceil(T/128)^2 in the buffer's
    shape, whose contiguity check guards on that size being 1, and the graph then recompiled when T crossed 128
    (benchmarks/NOTES.md entry 12)."""
    return max(triton.cdiv(size_hint(T), REF_TILE) ** 2, GHOST_MIN_PROGRAMS)


def per_sample_sq_norms(a: torch.Tensor, b: torch.Tensor, block: int | None = None, launch=None) -> torch.Tensor:
    """launch: torch.library.wrap_triton inside a triton_op (Inductor then emits the launch itself)."""
    launch = launch or (lambda k: k)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    P = max(_ref_tiles(M, N), 1)
    partial = torch.empty((B, P), device=a.device, dtype=torch.float32)
    if M > 0 and N > 0:
        kernel, blocks = _pick(_norm_kernel, _norm_tuned, block, launch, **_gemm_blocks(block, a))
        kernel[(B, P)](a, b, partial, T, M, N, *a.stride(), *b.stride(), P, _t_bucket(T), IEEE=ieee, **blocks)
    else:
        partial.zero_()
    return partial.sum(1)


def ghost_sq_norms(a: torch.Tensor, b: torch.Tensor, block: int | None = None, launch=None) -> torch.Tensor:
    launch = launch or (lambda k: k)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    P = _ghost_programs(T)
    partial = torch.empty((B, P), device=a.device, dtype=torch.float32)
    if M > 0 and N > 0 and T > 0:
        fixed = {"BLOCK_T": block or 32, "BLOCK_K": block or 32}
        kernel, blocks = _pick(_ghost_kernel, _ghost_tuned, block, launch, **fixed)
        kernel[(B, P)](a, b, partial, T, M, N, *a.stride(), *b.stride(), P, _t_bucket(T), IEEE=ieee, **blocks)
    else:
        partial.zero_()
    return partial.sum(1)


#: streaming multiprocessors of the GPU the launch heuristics are tuned for (an H100 SXM)
H100_SMS = 132


def sample_splits(M: int, N: int, sms: int = H100_SMS) -> int:
    """How many sample groups the clipped sum runs in parallel: enough programs for about two waves."""
    return max(1, min(8, -(-2 * sms // _ref_tiles(M, N))))


def clipped_sum(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, block: int | None = None,
                launch=None, splits: int | None = None) -> torch.Tensor:
    launch = launch or (lambda k: k)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    P = max(_ref_tiles(M, N), 1)
    S = splits or sample_splits(M, N)
    out = torch.empty((S, M, N), device=a.device, dtype=torch.float32 if S > 1 else out_dtype)
    if M > 0 and N > 0:
        coef = coef.to(torch.float32).contiguous()
        kernel, blocks = _pick(_clipped_sum_kernel, _clipped_sum_tuned, block, launch, **_gemm_blocks(block, a))
        kernel[(P, S)](a, b, coef, out, B, T, M, N, *a.stride(), *b.stride(), *out.stride(), P, S, _t_bucket(T),
                       IEEE=ieee, **blocks)
    return out.sum(0).to(out_dtype) if S > 1 else out[0]


def per_sample_tiles(a: torch.Tensor, b: torch.Tensor, block: int | None = None, launch=None):
    """(scratch (B, M, N) in the data dtype, squared norms of the stored values (B,) fp32): single-pass stage 1."""
    launch = launch or (lambda k: k)
    a, b, ieee = _common(a, b)
    B, T, M = a.shape
    N = b.shape[-1]
    P = max(_ref_tiles(M, N), 1)
    scratch = torch.empty((B, M, N), device=a.device, dtype=a.dtype)
    partial = torch.empty((B, P), device=a.device, dtype=torch.float32)
    if B > 0 and M > 0 and N > 0:
        kernel, blocks = _pick(_persample_kernel, _persample_tuned, block, launch, **_gemm_blocks(block, a))
        kernel[(B, P)](a, b, scratch, partial, T, M, N, *a.stride(), *b.stride(), P, _t_bucket(T), IEEE=ieee,
                       **blocks)
    else:
        partial.zero_()
    return scratch, partial.sum(1)


def scaled_reduce_(scratch: torch.Tensor, coef: torch.Tensor, acc: torch.Tensor, accumulate: bool,
                   launch=None) -> torch.Tensor:
    """acc (M, N) fp32 (+)= sum_s coef_s scratch_s: single-pass stage 2 (memory-bound, one read of the scratch)."""
    launch = launch or (lambda k: k)
    NB = scratch.shape[0]
    MN = acc.numel()
    if MN > 0:
        launch(_scaled_reduce_kernel)[(triton.cdiv(MN, REDUCE_BLOCK),)](
            scratch, coef.to(torch.float32).contiguous(), acc, NB, MN, ACCUMULATE=accumulate, BLOCK=REDUCE_BLOCK,
            BLOCK_S=REDUCE_SAMPLES, num_warps=REDUCE_WARPS)
    return acc
