"""Triton linear-site kernels against their PyTorch references (interpreter on CPU, real kernels on a GPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpcompile.codegen.kernels import linear as K
from dpcompile.codegen.ops import (linear_clipped_sum_reference, linear_direct_norm_reference,
                                  linear_norm_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def _check(a, b, coef, block):
    rtol, atol = TOL[a.dtype][1], TOL[a.dtype][0]
    norms = K.per_sample_sq_norms(a, b, block=block)
    assert norms.dtype == torch.float32 and norms.shape == (a.shape[0],)
    want = linear_norm_reference(a.double(), b.double())
    torch.testing.assert_close(norms.double(), want, rtol=rtol, atol=atol * (1 + want.abs().max().item() if want.numel() else 1))
    got = K.clipped_sum(a, b, coef, block=block)
    assert got.dtype == a.dtype and got.shape == (a.shape[2], b.shape[2])
    ref = linear_clipped_sum_reference(a.double(), b.double(), coef.double())
    scale = 1 + (ref.abs().max().item() if ref.numel() else 0)
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * scale)


@given(B=st.integers(0, 3), T=st.integers(1, 40), M=st.integers(1, 40), N=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_linear_kernels_match_reference(B, T, M, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, M, generator=g).to(DEVICE, dtype)
    b = torch.randn(B, T, N, generator=g).to(DEVICE, dtype)
    coef = torch.rand(B, generator=g).to(DEVICE)
    _check(a, b, coef, block=32 if DEVICE == "cpu" else None)


def test_time_major_and_strided_views():
    """(T, B, d) tensors seen as (B, T, d) views: the layout nn.MultiheadAttention produces."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 3, 20, generator=g).to(DEVICE).transpose(0, 1)
    b = torch.randn(7, 3, 40, generator=g).to(DEVICE)[:, :, ::2].transpose(0, 1)
    _check(a, b, torch.rand(3, generator=g).to(DEVICE), block=32 if DEVICE == "cpu" else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_is_of_the_fp32_product_not_a_rounded_one(dtype):
    """Large T: rounding each per-sample gradient to the data dtype before squaring would show up here."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 64, 16, generator=g).to(DEVICE, dtype)
    b = torch.randn(2, 64, 16, generator=g).to(DEVICE, dtype)
    norms = K.per_sample_sq_norms(a, b, block=32 if DEVICE == "cpu" else None)
    want = linear_norm_reference(a.double(), b.double())
    torch.testing.assert_close(norms.double(), want, rtol=1e-5, atol=1e-3)


def _operands(B, T, M, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, M, generator=g).to(DEVICE, dtype)
    b = torch.randn(B, T, N, generator=g).to(DEVICE, dtype)
    return a, b, torch.rand(B, generator=g).to(DEVICE)


def _close(got, want, dtype):
    rtol, atol = TOL[dtype][1], TOL[dtype][0]
    scale = 1 + (want.abs().max().item() if want.numel() else 0)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=atol * scale)


@given(B=st.integers(0, 3), T=st.integers(1, 70), M=st.integers(1, 40), N=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_ghost_norm_kernel_matches_reference(B, T, M, N, dtype, seed):
    """Upper-triangular T-tile pairs (off-diagonal ones doubled), T not a multiple of the tile, masked widths."""
    a, b, _ = _operands(B, T, M, N, dtype, seed)
    got = K.ghost_sq_norms(a, b, block=32 if DEVICE == "cpu" else None)
    assert got.dtype == torch.float32 and got.shape == (B,)
    _close(got, linear_direct_norm_reference(a.double(), b.double()), dtype)


@given(B=st.integers(0, 3), T=st.integers(1, 40), M=st.integers(1, 40), N=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), accumulate=st.booleans())
def test_single_pass_stages_match_reference(B, T, M, N, dtype, seed, accumulate):
    a, b, coef = _operands(B, T, M, N, dtype, seed)
    tiles, sq = K.per_sample_tiles(a, b, block=32 if DEVICE == "cpu" else None)
    assert tiles.dtype == dtype and tiles.shape == (B, M, N) and sq.dtype == torch.float32
    want_tiles = torch.bmm(a.double().transpose(1, 2), b.double())
    _close(tiles, want_tiles, dtype)
    # the norm is of the stored (rounded) values exactly, so the clip bound holds for what is summed
    torch.testing.assert_close(sq.double().cpu(), tiles.double().pow(2).sum((1, 2)).cpu(), rtol=1e-5, atol=1e-6)
    start = torch.randn(M, N, device=DEVICE)
    acc = start.clone()
    K.scaled_reduce_(tiles, coef, acc, accumulate=accumulate)
    want = torch.einsum("s,smn->mn", coef.double(), tiles.double()) + (start.double() if accumulate else 0)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [0, 1, K.REDUCE_SAMPLES, K.REDUCE_SAMPLES + 1, 2 * K.REDUCE_SAMPLES + 3])
@pytest.mark.parametrize("accumulate", [False, True])
def test_scaled_reduce_over_sample_tiles(B, accumulate):
    """The reduction loads REDUCE_SAMPLES samples' rows at a time: batches below, at and across that tile, and an
    output whose size is not a multiple of the block, give sum_s coef_s x_s (+ what acc held)."""
    g = torch.Generator().manual_seed(B)
    MN = K.REDUCE_BLOCK + 37
    tiles = torch.randn(B, 1, MN, generator=g).to(DEVICE, torch.float16)
    coef = torch.rand(B, generator=g).to(DEVICE)
    start = torch.randn(1, MN, generator=g).to(DEVICE)
    acc = start.clone()
    K.scaled_reduce_(tiles, coef, acc, accumulate=accumulate)
    want = torch.einsum("s,smn->mn", coef.double(), tiles.double()) + (start.double() if accumulate else 0)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_clipped_sum_sample_splits(splits):
    """Samples spread over a second grid axis (fewer samples than splits included): same sum."""
    a, b, coef = _operands(3, 9, 17, 12, torch.float32, 4)
    got = K.clipped_sum(a, b, coef, block=32 if DEVICE == "cpu" else None, splits=splits)
    _close(got, linear_clipped_sum_reference(a.double(), b.double(), coef.double()), torch.float32)


def test_norm_buffers_are_overwritten_not_accumulated():
    """Calling twice (autotuning on a GPU runs every config on the real buffers) gives the same norms."""
    a, b, _ = _operands(2, 33, 20, 30, torch.float32, 5)
    block = 32 if DEVICE == "cpu" else None
    for fn in (K.per_sample_sq_norms, K.ghost_sq_norms):
        first, second = fn(a, b, block=block), fn(a, b, block=block)
        assert torch.equal(first, second), fn.__name__
