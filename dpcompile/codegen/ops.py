"""The per-site custom ops the rewritten graph calls, with fake (shape) implementations and plain-PyTorch
reference implementations that run on every device.

Every op takes per-sample views whose dim 0 indexes samples:
  linear     a (B, T, M), b (B, T, N):  s_i = a_i^T b_i                      (weight of Linear / Conv1D / any mm)
  rows       x (B, R, P):               s_i = sum_r x_i[r]                    (bias, norm affine, elementwise params)
  embedding  idx (B, T), g (B, T, D):   s_i = sum_t onehot(idx_it) g_it       (embedding tables; padding row zero)
  persample  ps (B, *shape):            s_i = ps_i                            (materialized, general fallback)
`*_norm` returns the squared norms in the accumulation dtype (fp32; fp64 for fp64 data) ||s_i||^2, shape (B,); `*_clipped_sum` returns sum_i coef_i s_i, accumulated
in fp32 and returned in the data dtype. On CUDA, the linear ops run the Triton kernels of kernels/linear.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..clipping import group_clip_factors
from .registry import dp_custom_op, dp_op
from .sizes import size_hint



def _acc(x: Tensor, *others: Tensor) -> Tensor:
    """x in the accumulation dtype: fp32 for fp16/bf16/fp32 data, fp64 when any operand is fp64."""
    dtype = norm_dtype(x.dtype, *(o.dtype for o in others))
    return x.to(dtype)


def norm_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Norms and sums accumulate in fp32, or fp64 for fp64 data (tests run the contract in fp64)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# -- output metadata (dp_op's fake=): contiguous, as every body allocates its outputs ---------------------------


def _sample_norms_like(x: Tensor, *others: Tensor) -> Tensor:
    """(B,) squared norms in the accumulation dtype."""
    return x.new_empty((x.shape[0],), dtype=norm_dtype(x.dtype, *(o.dtype for o in others)))


def _linear_sum_fake(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    return a.new_empty((a.shape[2], b.shape[2]), dtype=torch.promote_types(a.dtype, b.dtype))


# -- linear ------------------------------------------------------------------------------------------------


def linear_direct_norm_reference(a: Tensor, b: Tensor) -> Tensor:
    a, b = _acc(a, b), _acc(b, a)
    return torch.bmm(a.transpose(1, 2), b).pow(2).sum((1, 2))


def linear_ghost_norm_reference(a: Tensor, b: Tensor) -> Tensor:
    """<a_i a_i^T, b_i b_i^T>: never forms s_i; B x T x T Gram matrices instead."""
    a, b = _acc(a, b), _acc(b, a)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2)).clamp_min(0)


def linear_norm_reference(a: Tensor, b: Tensor) -> Tensor:
    B, T, M = (size_hint(s) for s in a.shape)
    N = size_hint(b.shape[-1])
    if T * T * (M + N) < T * M * N:  # the cheaper of the two exact forms
        return linear_ghost_norm_reference(a, b)
    return linear_direct_norm_reference(a, b)


def linear_clipped_sum_reference(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = _acc(a, b), _acc(b, a)
    scaled = a * coef.to(a.dtype).view(-1, 1, 1)
    return (scaled.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])).to(out_dtype)


def _use_triton(*tensors: Tensor) -> bool:
    return tensors[0].device.type == "cuda" and torch.float64 not in {t.dtype for t in tensors}


# triton_op: on CUDA, Inductor sees the Triton launches inside and emits them itself (no Python op in between);
# elsewhere (CPU, fp64) the body is the PyTorch reference.
@dp_op(role="norm", fake=_sample_norms_like)
def linear_norm(a: Tensor, b: Tensor) -> Tensor:
    """Direct per-sample norms: a GEMM per sample with the norm in its epilogue."""
    if not _use_triton(a, b):
        return linear_norm_reference(a, b)
    from .kernels.linear import per_sample_sq_norms

    return per_sample_sq_norms(a, b, launch=torch.library.wrap_triton)


@dp_op(role="norm", fake=_sample_norms_like)
def linear_ghost_norm(a: Tensor, b: Tensor) -> Tensor:
    """Ghost per-sample norms: Gram products of the T rows, on chip."""
    if not _use_triton(a, b):
        return linear_ghost_norm_reference(a, b)
    from .kernels.linear import ghost_sq_norms

    return ghost_sq_norms(a, b, launch=torch.library.wrap_triton)


@dp_op(role="clipped_sum", fake=_linear_sum_fake)
def linear_clipped_sum(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    if not _use_triton(a, b):
        return linear_clipped_sum_reference(a, b, coef)
    from .kernels.linear import clipped_sum

    return clipped_sum(a, b, coef, launch=torch.library.wrap_triton)


def _products(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample products (B, M, N) in the data dtype from the vendor batched GEMM: cuBLAS bmm runs at the non-DP
    weight gradient's speed on these shapes, where our Triton tile kernel reached 40% of it (NOTES.md, entry 4)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.bmm(a.to(dtype).transpose(1, 2), b.to(dtype))


def _tiles_and_norms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The products and the squared norms of exactly the stored values in the accumulation dtype (a reduction
    Inductor fuses). Norming the stored values keeps the clip bound exact for what is summed."""
    tiles = _products(a, b)
    return tiles, _stored_sq_norms(tiles, (1, 2))


def _stored_sq_norms(tiles: Tensor, dim) -> Tensor:
    """Squared norms over `dim` of exactly the stored products, in the accumulation dtype, without an
    accumulation-dtype copy of the products (the chunked op runs eagerly)."""
    return torch.linalg.vector_norm(tiles, dim=dim, dtype=norm_dtype(tiles.dtype)).square()


def _reduce_into(tiles: Tensor, coef: Tensor, acc: Tensor, accumulate: bool, launch=None) -> None:
    if tiles.device.type == "cuda" and acc.dtype == torch.float32:
        from .kernels.linear import scaled_reduce_

        scaled_reduce_(tiles, coef, acc, accumulate, launch=launch)
        return
    part = torch.einsum("s,smn->mn", coef.to(acc.dtype), tiles.to(acc.dtype))
    acc.copy_(acc + part if accumulate else part)


def _clip_coefficients(sq: Tensor, rest_sq: Tensor, sq_scale: float, threshold: float, clip_fn: str, mean: bool,
                       batch) -> Tensor:
    return group_clip_factors(rest_sq.to(sq.dtype) + sq * sq_scale, threshold, clip_fn, mean, batch)


# The whole batch at once: a triton_op (Inductor inlines it; no Python on the step). The planner takes it when the
# scratch of the compiled batch size fits the budget, and the chunked custom op below when it does not.
@dp_op(role="clipped_sum")
def linear_single_pass(a: Tensor, b: Tensor, rest_sq: Tensor, sq_scale: float, threshold: float, clip_fn: str,
                       mean: bool) -> tuple[Tensor, Tensor]:
    """Single-pass clipping of a group whose only linear site is (a, b): every per-sample product is formed once;
    its norm (times sq_scale) plus `rest_sq` (the squared norms of the group's other parameters) gives the clip
    factor, and the products are reduced as sum_i coef_i s_i. Returns (the clipped sum, the group's
    coefficients for its other sites)."""
    tiles, sq = _tiles_and_norms(a, b)
    acc_dtype = norm_dtype(a.dtype, b.dtype, rest_sq.dtype)
    coef = _clip_coefficients(sq.to(acc_dtype), rest_sq, sq_scale, threshold, clip_fn, mean, a.shape[0])
    return _tiles_clipped_sum(tiles, coef, acc_dtype), coef


def _tiles_clipped_sum(tiles: Tensor, coef: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """sum_i coef_i tiles_i accumulated in acc_dtype, returned in the tiles' dtype."""
    acc = torch.empty(tiles.shape[1:], device=tiles.device, dtype=acc_dtype)
    _reduce_into(tiles, coef, acc, accumulate=False, launch=torch.library.wrap_triton if _use_triton(tiles) else None)
    return acc.to(tiles.dtype)


# the same quantities as the direct strategy's, so the same references
linear_tile_norm_reference = linear_direct_norm_reference
linear_tile_clipped_sum_reference = linear_clipped_sum_reference


# two_pass: the per-sample products formed twice by the vendor GEMM (for the norms, then for the clipped sum) and
# never kept between the two passes; the choice for the sites of a group that cannot all be single-pass (flat).
@dp_op(role="norm", fake=_sample_norms_like)
def linear_tile_norm(a: Tensor, b: Tensor) -> Tensor:
    return _tiles_and_norms(a, b)[1]


@dp_op(role="clipped_sum", fake=_linear_sum_fake)
def linear_tile_clipped_sum(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    return _tiles_clipped_sum(_products(a, b), coef, norm_dtype(a.dtype, b.dtype, coef.dtype))


def linear_products_reference(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.bmm(a.to(dtype).transpose(1, 2), b.to(dtype))


def linear_tiles_reference(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    tiles = linear_products_reference(a, b)
    return tiles, tiles.to(norm_dtype(tiles.dtype)).pow(2).sum(2)


def tiles_clipped_sum_reference(tiles: Tensor, coef: Tensor) -> Tensor:
    acc = norm_dtype(tiles.dtype, coef.dtype)
    return torch.einsum("s,smn->mn", coef.to(acc), tiles.to(acc)).to(tiles.dtype)


# stored: the per-sample products formed once by the vendor GEMM and kept until the group's clip factor is known;
# the choice for the other sites of a flat group where the products take no more memory than the operands (a, b)
# the other multi-pass strategies keep for their clipped sum (M N <= T (M + N)).
@dp_op(role="norm")
def linear_tiles(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(the per-sample products (B, M, N) in the data dtype, the squared norms of their rows (B, M) in the
    accumulation dtype): a sample's squared norm is its row sums' sum, which the rewrite takes with Inductor or
    hands to rows_group_clipped_sum as its `rest` (one reduction over the products, none over the rows)."""
    tiles = _products(a, b)
    return tiles, _stored_sq_norms(tiles, 2)


# randomized_stored: the products kept as stored keeps them, normed by the probe estimate instead (randomized_ops);
# no exact norm beside them, which eager execution would compute and throw away.
@dp_op(role="prepare")
def linear_products(a: Tensor, b: Tensor) -> Tensor:
    """The per-sample products (B, M, N) in the data dtype."""
    return _products(a, b)


@dp_op(role="clipped_sum")
def tiles_clipped_sum(tiles: Tensor, coef: Tensor) -> Tensor:
    """sum_i coef_i tiles_i of stored products, accumulated in fp32 (fp64 for fp64), in the tiles' dtype."""
    return _tiles_clipped_sum(tiles, coef, norm_dtype(tiles.dtype, coef.dtype))


# A custom_op, not a triton_op: the chunk loop runs on concrete sizes (the batch dim is symbolic at compile time).
@dp_custom_op(role="clipped_sum")
def linear_single_pass_chunked(a: Tensor, b: Tensor, rest_sq: Tensor, sq_scale: float, threshold: float,
                               clip_fn: str, mean: bool, budget_bytes: int) -> tuple[Tensor, Tensor]:
    """linear_single_pass in chunks of samples whose products fit `budget_bytes` (one Python loop per step)."""
    B, T, M = a.shape
    N = b.shape[-1]
    acc_dtype = norm_dtype(a.dtype, b.dtype, rest_sq.dtype)
    acc = torch.zeros((M, N), device=a.device, dtype=acc_dtype)
    coefs = torch.empty((B,), device=a.device, dtype=acc_dtype)
    per_sample = max(M * N * max(a.element_size(), b.element_size()), 1)
    chunk = max(1, budget_bytes // per_sample)
    for s0 in range(0, B, chunk):
        s1 = min(B, s0 + chunk)
        tiles, sq = _tiles_and_norms(a[s0:s1], b[s0:s1])
        coef = _clip_coefficients(sq.to(acc_dtype), rest_sq[s0:s1], sq_scale, threshold, clip_fn, mean, B)
        coefs[s0:s1] = coef
        _reduce_into(tiles, coef, acc, accumulate=s0 > 0)
    return acc.to(torch.promote_types(a.dtype, b.dtype)), coefs


@linear_single_pass_chunked.register_fake
def _(a, b, rest_sq, sq_scale, threshold, clip_fn, mean, budget_bytes):
    out = a.new_empty((a.shape[2], b.shape[2]), dtype=torch.promote_types(a.dtype, b.dtype))
    return out, rest_sq.new_empty((a.shape[0],), dtype=norm_dtype(a.dtype, b.dtype, rest_sq.dtype))


# -- rows (bias, norm affine, elementwise) ----------------------------------------------------------------
# rows and persample ops are triton_ops with plain-PyTorch bodies: Inductor traces the body into the graph and
# fuses it into its own kernels (no Python op call per site); eager and CPU run the same body.


def rows_norm_reference(x: Tensor) -> Tensor:
    return _acc(x).sum(1).pow(2).sum(1)


def rows_clipped_sum_reference(x: Tensor, coef: Tensor) -> Tensor:
    # a broadcast product summed over the samples, not coef @ xs: a (1, B) x (B, P) matrix product is one vendor
    # GEMM launch per bias or norm parameter, where Inductor fuses this reduction with its casts and with the
    # other parameters' of the same width (benchmarks/NOTES.md, entry 19)
    xs = _acc(x).sum(1)
    return (coef.to(xs.dtype).unsqueeze(1) * xs).sum(0).to(x.dtype)


def rows_colsum_reference(x: Tensor) -> Tensor:
    """Per-sample row sums (B, P) in the accumulation dtype: the group's norm and clipped sum both read this small
    tensor, so x is read once (Inductor fuses the producer of x, e.g. dY * x_hat, into this reduction)."""
    return _acc(x).sum(1)


# the ops' bodies are the references themselves
rows_colsum = dp_op(role="prepare", name="rows_colsum",
                    fake=lambda x: x.new_empty((x.shape[0], x.shape[2]), dtype=norm_dtype(x.dtype)))(
    rows_colsum_reference)
rows_norm = dp_op(role="norm", name="rows_norm", fake=_sample_norms_like)(rows_norm_reference)
rows_clipped_sum = dp_op(role="clipped_sum", name="rows_clipped_sum",
                         fake=lambda x, coef: x.new_empty((x.shape[2],)))(rows_clipped_sum_reference)


def rows_group_clipped_sum_reference(xs: list, rest_sq: Optional[Tensor], threshold: float, clip_fn: str,
                                     mean: bool) -> list:
    sq = None
    for x in xs:
        n2 = x.pow(2).sum(1)
        sq = n2 if sq is None else sq + n2
    if rest_sq is not None:
        sq = sq + (rest_sq.sum(1) if rest_sq.dim() == 2 else rest_sq).to(sq.dtype)
    coef = group_clip_factors(sq, threshold, clip_fn, mean, xs[0].shape[0])
    return [coef, *((coef.unsqueeze(1) * x).sum(0) for x in xs)]


def _rows_group_clipped_sum_fake(xs, rest_sq, threshold, clip_fn, mean):
    return [xs[0].new_empty((xs[0].shape[0],)), *(x.new_empty((x.shape[1],)) for x in xs)]


@dp_op(role="clipped_sum", fake=_rows_group_clipped_sum_fake)
def rows_group_clipped_sum(xs: list[Tensor], rest_sq: Optional[Tensor], threshold: float, clip_fn: str,
                           mean: bool) -> list[Tensor]:
    """A group's rows sites and its clip factor together: from the per-sample row sums xs[k] (B, P_k) of its rows
    sites (rows_colsum's) and the squared norms of its other sites (rest_sq: (B,), or (B, K) parts each sample's
    norm is the sum of, or None), [the group's factors (B,), sum_i coef_i xs[k]_i for each k]. On CUDA one or two
    rows sites take one launch (kernels/rows.py) where the norms, the factor and the sums were a kernel each."""
    if len(xs) <= 2 and _use_triton(*xs) and all(x.dtype == torch.float32 and x.stride(1) == 1 for x in xs) \
            and sum(x.shape[1] for x in xs) > 0:
        from .kernels.rows import group_clip_rows

        rest = None if rest_sq is None else rest_sq.to(torch.float32).contiguous()
        return group_clip_rows(list(xs), rest, threshold, clip_fn, mean, launch=torch.library.wrap_triton)
    return rows_group_clipped_sum_reference(list(xs), rest_sq, threshold, clip_fn, mean)


# -- embedding ----------------------------------------------------------------------------------------------


def _embedding_rows(idx: Tensor, g: Tensor, padding_idx: int):
    """Each (sample, row) pair's summed gradient row, without a B x V table and without a host sync: the pairs are
    sorted and summed by segment into B*T slots (a bound on their number; slots no pair took stay zero and belong
    to sample 0). torch.unique and boolean-mask indexing would each wait for the GPU to learn an output size:
    a stall of the whole step's launch queue at every embedding site."""
    B, T = idx.shape
    n = B * T
    idx = idx.long()
    sample = torch.arange(B, device=idx.device).view(B, 1).expand(B, T)
    key = (sample * (idx.max().clamp_min(0) + 1 if idx.numel() else 1) + idx).reshape(n)
    key, order = torch.sort(key)
    # full-size comparisons only: a slice of n - 1 could have a size hint of 1, and a broadcast asking "is this
    # size 1?" would then specialize the batch size (benchmarks/NOTES.md, entry 17 addendum)
    starts = (key != torch.roll(key, 1)) | (torch.arange(n, device=key.device) == 0)
    segment = torch.cumsum(starts, 0) - 1
    vals = _acc(g).reshape(n, g.shape[-1])[order]
    if padding_idx >= 0:  # the padding row gets no gradient: its pairs sum to zero
        vals = vals * (idx.reshape(n)[order] != padding_idx).unsqueeze(1).to(vals.dtype)
    rows = vals.new_zeros((n, g.shape[-1])).index_add_(0, segment, vals)
    owner = sample.reshape(n).new_zeros(n).scatter_(0, segment, sample.reshape(n)[order])
    return rows, owner


def embedding_norm_reference(idx: Tensor, g: Tensor, padding_idx: int) -> Tensor:
    rows, owner = _embedding_rows(idx, g, padding_idx)
    out = torch.zeros(idx.shape[0], device=g.device, dtype=norm_dtype(g.dtype))
    return out.index_add_(0, owner, rows.pow(2).sum(1).to(out.dtype))


def embedding_clipped_sum_reference(idx: Tensor, g: Tensor, coef: Tensor, num_weights: int, padding_idx: int) -> Tensor:
    B, T = idx.shape
    gs = _acc(g) * coef.to(_acc(g).dtype).view(B, 1, 1)
    out = gs.new_zeros((num_weights, g.shape[-1]))
    flat_idx = idx.reshape(-1).long()
    vals = gs.reshape(-1, g.shape[-1])
    if padding_idx >= 0:
        vals = vals * (flat_idx != padding_idx).unsqueeze(1).to(vals.dtype)
    return out.index_add_(0, flat_idx, vals).to(g.dtype)


# sorted segment sums with static sizes (no torch.unique, no boolean masks): traceable, so inlined like the others
embedding_norm = dp_op(role="norm", name="embedding_norm")(embedding_norm_reference)
embedding_clipped_sum = dp_op(role="clipped_sum", name="embedding_clipped_sum")(embedding_clipped_sum_reference)


# -- materialized per-sample gradients (general fallback) ---------------------------------------------------


def _flat(ps: Tensor) -> Tensor:
    return _acc(ps).reshape(ps.shape[0], math.prod(ps.shape[1:]))  # no -1: B may be 0


def persample_norm_reference(ps: Tensor) -> Tensor:
    return _flat(ps).pow(2).sum(1)


def persample_clipped_sum_reference(ps: Tensor, coef: Tensor) -> Tensor:
    flat = _flat(ps)
    return (coef.to(flat.dtype) @ flat).reshape(ps.shape[1:]).to(ps.dtype)


persample_norm = dp_op(role="norm", name="persample_norm", fake=_sample_norms_like)(persample_norm_reference)
persample_clipped_sum = dp_op(role="clipped_sum", name="persample_clipped_sum",
                              fake=lambda ps, coef: ps.new_empty(ps.shape[1:]))(persample_clipped_sum_reference)
