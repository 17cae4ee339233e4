"""The tied table's embedding and cross norm terms (codegen/tied_embedding_ops.py), on chip, for each sample i:

  emb_i   = sum_{t,u} [idx_t == idx_u != pad] <g_t, g_u>          (||G_i||^2)
  cross_i = sum_{t,s} [idx_t != pad] dy_i[s, idx_t] <g_t, h_s>     (<G_i, E_i>)

with idx (B, Te), g (B, Te, d), h (B, Th, d), dy (B, Th, V). One launch, grid (B, P): each program loops with
stride P over the work items of its sample, the upper-triangular pairs of Te-tiles (off-diagonal pairs counted
twice) and the (Te-tile, Th-tile) pairs; each item forms its Gram tile g h^T (or g g^T) in fp32 over d in
BLOCK_K slices, and the cross item gathers the (Te-tile, Th-tile) entries dy_i[s, idx_t] straight from dy (the
Te columns sample i's ids name, never a V x d tile). Partial sums per (sample, program) are written to a buffer
that the launch overwrites completely and reduced in a fixed order (no atomics), as in kernels/linear.py.
fp32 operands use IEEE fp32 products; fp16/bf16 go to the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sizes import size_hint

REF_TILE = 128  # the programs per sample are laid out for tiles of this many rows
MIN_PROGRAMS = 16


@triton.jit
def _rows_gram(x_ptr, y_ptr, sample, rp, rq, TX, TY, K, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """x_i[rp] y_i[rq]^T, (BLOCK_T, BLOCK_T) in fp32 (rows past TX / TY read as zeros)."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    xb = x_ptr + tl.cast(sample, tl.int64) * sx_b
    yb = y_ptr + tl.cast(sample, tl.int64) * sy_b
    rk0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        xp = tl.load(xb + rp[:, None] * sx_t + rk[None, :] * sx_k, mask=(rp[:, None] < TX) & (rk[None, :] < K),
                     other=0.0)
        yq = tl.load(yb + rq[:, None] * sy_t + rk[None, :] * sy_k, mask=(rq[:, None] < TY) & (rk[None, :] < K),
                     other=0.0)
        if IEEE:
            acc += tl.dot(xp, tl.trans(yq), input_precision="ieee")
        else:
            acc += tl.dot(xp, tl.trans(yq))
    return acc


@triton.jit
def _norm_terms_kernel(idx_ptr, g_ptr, h_ptr, dy_ptr, partial_ptr, Te, Th, D, PAD,
                       si_b, si_t, sg_b, sg_t, sg_d, sh_b, sh_t, sh_d, sy_b, sy_t, sy_v, P,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    sample = tl.program_id(0)
    pid = tl.program_id(1)
    te = tl.cdiv(Te, BLOCK_T)
    th = tl.cdiv(Th, BLOCK_T)
    ib = idx_ptr + tl.cast(sample, tl.int64) * si_b
    yb = dy_ptr + tl.cast(sample, tl.int64) * sy_b
    r0 = tl.arange(0, BLOCK_T)
    emb = 0.0
    cross = 0.0
    for w in range(pid, te * te + te * th, P):
        if w < te * te:
            p = w // te
            q = w % te
            if p <= q:
                rp = p * BLOCK_T + r0
                rq = q * BLOCK_T + r0
                gram = _rows_gram(g_ptr, g_ptr, sample, rp, rq, Te, Te, D, sg_b, sg_t, sg_d, sg_b, sg_t, sg_d,
                                  BLOCK_T, BLOCK_K, IEEE)
                ip = tl.load(ib + rp * si_t, mask=rp < Te, other=PAD)
                iq = tl.load(ib + rq * si_t, mask=rq < Te, other=PAD)
                keep = (ip[:, None] == iq[None, :]) & (ip[:, None] != PAD) & (rp[:, None] < Te) & (rq[None, :] < Te)
                weight = tl.where(p < q, 2.0, 1.0)
                emb += weight * tl.sum(tl.sum(tl.where(keep, gram, 0.0), axis=1), axis=0)
        else:
            p = (w - te * te) // th
            s = (w - te * te) % th
            rp = p * BLOCK_T + r0
            rs = s * BLOCK_T + r0
            gram = _rows_gram(g_ptr, h_ptr, sample, rp, rs, Te, Th, D, sg_b, sg_t, sg_d, sh_b, sh_t, sh_d,
                              BLOCK_T, BLOCK_K, IEEE)
            ip = tl.load(ib + rp * si_t, mask=rp < Te, other=0)
            valid = (rp[:, None] < Te) & (rs[None, :] < Th) & (ip[:, None] != PAD)
            cols = tl.load(yb + rs[None, :] * sy_t + ip[:, None] * sy_v, mask=valid, other=0.0).to(tl.float32)
            cross += tl.sum(tl.sum(gram * cols, axis=1), axis=0)
    base = partial_ptr + (sample * P + pid) * 2
    tl.store(base, emb)
    tl.store(base + 1, cross)


def norm_terms(idx: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dy: torch.Tensor, padding_idx: int,
               block: int | None = None, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(emb (B,), cross (B,)) in fp32. launch: torch.library.wrap_triton inside a triton_op."""
    launch = launch or (lambda k: k)
    dtype = torch.promote_types(torch.promote_types(g.dtype, h.dtype), dy.dtype)
    if dtype == torch.float64:
        raise TypeError("the Triton tied-embedding kernel takes fp32/fp16/bf16 operands; fp64 uses the reference")
    g, h, dy = g.to(dtype), h.to(dtype), dy.to(dtype)
    B, Te, D = g.shape
    Th = h.shape[1]
    P = max(triton.cdiv(size_hint(Te), REF_TILE) * (triton.cdiv(size_hint(Te), REF_TILE)
                                                    + triton.cdiv(size_hint(Th), REF_TILE)), MIN_PROGRAMS)
    partial = torch.empty((B, P, 2), device=g.device, dtype=torch.float32)
    if D > 0 and Te > 0:
        launch(_norm_terms_kernel)[(B, P)](
            idx, g, h, dy, partial, Te, Th, D, padding_idx, *idx.stride(), *g.stride(), *h.stride(), *dy.stride(),
            P, BLOCK_T=block or 64, BLOCK_K=block or 32, IEEE=dtype == torch.float32)
    else:
        partial.zero_()
    terms = partial.sum(1)
    return terms[:, 0], terms[:, 1]
