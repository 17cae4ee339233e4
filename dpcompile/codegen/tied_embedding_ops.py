"""Ops of the `tied_embedding` site (passes/sites/tied_embedding.py): one parameter W (V, d) used both as an
embedding table (rows gathered by ids) and as a linear head (logits = H W^T), never forming a (B, V, d) tensor.

Per-sample operands, samples on dim 0:
  idx (B, Te) ids, g (B, Te, d) output gradients of the embedding   G_i = sum_t onehot(idx_it) g_it   (V, d)
  h (B, Th, d) head inputs, dy (B, Th, V) logit gradients             E_i = dy_i^T h_i                   (V, d)
and the signed scalars ke, kh of each use's chain, so that sample i's gradient is ke G_i + kh E_i. A padding row
(padding_idx >= 0) gets no embedding gradient (its g_t are dropped), but still its head gradient.

  ||ke G_i + kh E_i||^2 = ke^2 ||G_i||^2 + kh^2 ||E_i||^2 + 2 ke kh <G_i, E_i>
  ||G_i||^2   = sum_{t,t'} [idx_t == idx_t'] <g_t, g_t'>                      Te x Te x d per sample
  ||E_i||^2   = sum_{s,s'} <h_s, h_s'> <dy_s, dy_s'>  (ghost)                  Th x Th x (V + d)
                or the direct per-sample GEMM with the norm in its epilogue (CUDA Triton kernel of kernels/linear.py,
                the product tiled on chip, never written)
  <G_i, E_i>  = sum_t <g_t, E_i[idx_t]> = sum_{t,s} dy_i[s, idx_t] <g_t, h_s>  Te x Th x d, plus a gather of the
                Te columns of dy_i that sample i's ids name
  clipped sum = index_add of the coef-scaled g by ids (times ke) + kh (coef-scaled dy)^T H (one vendor GEMM)

Liger-style: each op's plain-PyTorch reference sits next to it; the ops are triton_ops (Inductor inlines their
bodies) whose bodies are the references, except on CUDA: the norm launches the Triton kernels (kernels/linear.py for
||E_i||^2, kernels/tied_embedding.py for the embedding and cross terms, tested on CPU under TRITON_INTERPRET=1),
and the clipped sum takes its GEMM in the data dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops import norm_dtype
from .registry import dp_op

HEAD_NORMS = ("ghost", "direct")


def _masked(idx: Tensor, g: Tensor, padding_idx: int) -> Tensor:
    if padding_idx >= 0:
        return g * (idx != padding_idx).unsqueeze(-1).to(g.dtype)
    return g


def embedding_gram_sq_norm(idx: Tensor, g: Tensor, padding_idx: int) -> Tensor:
    """||G_i||^2 = sum_{t,t'} [idx_t == idx_t'] <g_t, g_t'> (accumulation dtype), from Te x Te Gram products:
    static shapes (no unique), so the body traces under symbolic B and T."""
    acc = norm_dtype(g.dtype)
    g = _masked(idx, g.to(acc), padding_idx)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(acc)
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))


def head_ghost_sq_norm(h: Tensor, dy: Tensor) -> Tensor:
    """||dy_i^T h_i||^2 = sum_{s,s'} <h_s, h_s'> <dy_s, dy_s'>: Th x Th Gram matrices, never V x d."""
    acc = norm_dtype(h.dtype, dy.dtype)
    h, dy = h.to(acc), dy.to(acc)
    return (torch.bmm(dy, dy.transpose(1, 2)) * torch.bmm(h, h.transpose(1, 2))).sum((1, 2))


def cross_term(idx: Tensor, g: Tensor, h: Tensor, dy: Tensor, padding_idx: int) -> Tensor:
    """<G_i, E_i> = sum_{t,s} dy_i[s, idx_t] <g_t, h_s>: the Te columns of dy_i at sample i's ids, gathered."""
    acc = norm_dtype(g.dtype, h.dtype, dy.dtype)
    g, h, dy = _masked(idx, g.to(acc), padding_idx), h.to(acc), dy.to(acc)
    B, Th, Te = dy.shape[0], dy.shape[1], idx.shape[1]
    cols = torch.gather(dy, 2, idx.long().unsqueeze(1).expand(B, Th, Te))  # (B, Th, Te): dy[i, s, idx[i, t]]
    return (torch.bmm(h, g.transpose(1, 2)) * cols).sum((1, 2))


def tied_embedding_norm_reference(idx: Tensor, g: Tensor, h: Tensor, dy: Tensor, ke: float, kh: float,
                                  padding_idx: int, head_norm: str) -> Tensor:
    """||ke G_i + kh E_i||^2, (B,), in the accumulation dtype (every term by its identity above)."""
    emb = embedding_gram_sq_norm(idx, g, padding_idx)
    head = head_ghost_sq_norm(h, dy)
    cross = cross_term(idx, g, h, dy, padding_idx)
    return (emb * (ke * ke) + head * (kh * kh) + cross * (2.0 * ke * kh)).clamp_min(0)


def tied_embedding_clipped_sum_reference(idx: Tensor, g: Tensor, h: Tensor, dy: Tensor, coef: Tensor, ke: float,
                                         kh: float, padding_idx: int) -> Tensor:
    """sum_i coef_i (ke G_i + kh E_i), (V, d), accumulated in fp32 (fp64 for fp64), in the data dtype."""
    out_dtype = torch.promote_types(g.dtype, h.dtype)
    acc = norm_dtype(g.dtype, h.dtype, dy.dtype, coef.dtype)
    c = coef.to(acc)
    return (_embedding_sum(idx, g, c * ke, padding_idx, dy.shape[-1], acc)
            + _head_sum_reference(h, dy, c * kh, acc)).to(out_dtype)


def _embedding_sum(idx, g, c, padding_idx, num_weights, acc):
    B, d = g.shape[0], g.shape[-1]
    vals = _masked(idx, g.to(acc) * c.view(B, 1, 1), padding_idx)
    return vals.new_zeros((num_weights, d)).index_add(0, idx.reshape(-1).long(), vals.reshape(-1, d))


def _head_sum_reference(h, dy, c, acc):
    B = dy.shape[0]
    scaled = dy.to(acc) * c.view(B, 1, 1)
    return scaled.reshape(-1, dy.shape[-1]).t() @ h.to(acc).reshape(-1, h.shape[-1])


def _use_triton(*tensors: Tensor) -> bool:
    return tensors[0].device.type == "cuda" and torch.float64 not in {t.dtype for t in tensors}


@dp_op(role="norm")
def tied_embedding_norm(idx: Tensor, g: Tensor, h: Tensor, dy: Tensor, ke: float, kh: float, padding_idx: int,
                        head_norm: str) -> Tensor:
    """Per-sample squared norms of a tied table's gradient. head_norm: "ghost" (Gram products) or "direct" (the
    per-sample GEMM with the norm in its epilogue). On CUDA: the head's norm by the Triton kernel of
    kernels/linear.py (direct or ghost), the embedding and cross terms by kernels/tied_embedding.py (one launch).
    Elsewhere (CPU, fp64) the references, with the ghost form for both (the direct form would write the (B, V, d)
    products: the same exact value)."""
    if head_norm not in HEAD_NORMS:
        raise ValueError(f"head_norm {head_norm!r} is not one of {HEAD_NORMS}")
    if not _use_triton(h, dy):
        return tied_embedding_norm_reference(idx, g, h, dy, ke, kh, padding_idx, head_norm)
    from .kernels.linear import ghost_sq_norms, per_sample_sq_norms
    from .kernels.tied_embedding import norm_terms

    launch = torch.library.wrap_triton
    head = (per_sample_sq_norms if head_norm == "direct" else ghost_sq_norms)(dy, h, launch=launch)
    emb, cross = norm_terms(idx, g, h, dy, padding_idx, launch=launch)
    return (emb * (ke * ke) + head * (kh * kh) + cross * (2.0 * ke * kh)).clamp_min(0)


@dp_op(role="clipped_sum")
def tied_embedding_clipped_sum(idx: Tensor, g: Tensor, h: Tensor, dy: Tensor, coef: Tensor, ke: float, kh: float,
                               padding_idx: int) -> Tensor:
    """sum_i coef_i (ke G_i + kh E_i): an index_add of the scaled embedding gradients plus one GEMM of the scaled
    dY with H, the non-private weight gradient's own GEMM (on CUDA in the data dtype: the vendor GEMM, fp32
    accumulation; the scaling is a pointwise op Inductor fuses into dY's producer)."""
    if not _use_triton(h, dy):
        return tied_embedding_clipped_sum_reference(idx, g, h, dy, coef, ke, kh, padding_idx)
    acc = norm_dtype(g.dtype, h.dtype, dy.dtype, coef.dtype)
    c = coef.to(acc)
    dtype = torch.promote_types(h.dtype, dy.dtype)
    scaled = (dy.to(acc) * (c * kh).view(-1, 1, 1)).to(dtype)
    head = scaled.reshape(-1, dy.shape[-1]).t() @ h.to(dtype).reshape(-1, h.shape[-1])
    emb = _embedding_sum(idx, g, c * ke, padding_idx, dy.shape[-1], acc)
    return (emb + head.to(acc)).to(torch.promote_types(g.dtype, h.dtype))
