"""Triton linear-site kernels against their PyTorch references (interpreter on CPU, real kernels on a GPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpcompile.codegen.kernels import linear as K
from dpcompile.codegen.ops import linear_clipped_sum_reference, linear_norm_reference

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
