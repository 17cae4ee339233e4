"""Randomized (probe-estimated) per-sample norms, DP-SGD-RC: kernels against their PyTorch reference (interpreter
on CPU), the estimator's statistics, Hutch++ exactness, the ops, and the mixture-of-Gaussians accounting."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from dpcompile.codegen import randomized_ops as RO
from dpcompile.codegen.kernels import randomized as K
from dpcompile.codegen.ops import linear_clipped_sum_reference, linear_norm_reference
from dpcompile.privacy import randomized_accounting as RA
from dpcompile.privacy.accounting import (PrivacyAccountant, RandomizedAccountingError, get_epsilon,
                                          get_noise_multiplier)

logging.getLogger("absl").setLevel(logging.ERROR)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 32 if DEVICE == "cpu" else None  # large tiles: few interpreted programs
SEED = 0x5EED_0123_4567_89AB


@pytest.fixture(autouse=True)
def _clean_state():
    """Randomized-norm runs are recorded process-wide for the accountant: never leak them into other tests."""
    RA.take_randomized_use()
    RO.manual_probe_seed(None)
    yield
    RA.take_randomized_use()
    RO.manual_probe_seed(None)


def _exact(a, b):
    a, b = K._as_sites(a, b)
    return torch.bmm(a.double().transpose(1, 2), b.double()).pow(2).sum((1, 2))


def _low_rank(B, T, M, N, rank, gen, dtype=torch.float32):
    """a_i^T b_i of rank <= `rank`: a_i = U_i P_i with P_i (rank x M), small integers so that the product is exact
    (in fp16 too) and the rank really is `rank`."""
    a = (torch.randint(-3, 4, (B, T, rank), generator=gen) @ torch.randint(-3, 4, (B, rank, M), generator=gen)).float()
    b = torch.randn(B, T, N, generator=gen)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------- probes
def test_kernel_probes_are_the_reference_probes():
    got = K.dump_probes(SEED, 7, 3, 45, 5, 20, DEVICE).cpu()
    want = K.gaussian_probes_reference(SEED, 7, 3, 45, range(5, 25))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # equal Philox integers; log/cos to an ulp or so
    # a seed given as a tensor draws the same probes
    t = K.gaussian_probes_reference(torch.tensor([SEED]), 7, 3, 45, range(5, 25))
    assert torch.equal(t, want)


def test_philox_matches_published_test_vectors():
    # Philox4x32-10 known-answer tests (Random123 kat_vectors): counter, key -> output
    r = K.philox4x32(0, 0, 0, 0, 0)
    assert [int(x) for x in r] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    r = K.philox4x32(2 ** 64 - 1, *[0xFFFFFFFF] * 4)
    assert [int(x) for x in r] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    seed = 0xA4093822 | (0x299F31D0 << 32)
    r = K.philox4x32(seed, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert [int(x) for x in r] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_probes_are_standard_normal_and_independent():
    v = K.gaussian_probes_reference(SEED, 0, 64, 128, range(32)).double()  # 262,144 draws
    n = v.numel()
    assert abs(v.mean().item()) < 5 / math.sqrt(n)
    assert abs(v.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(v.flatten().numpy(), "norm").pvalue > 1e-4
    # different samples, sites, probes and seeds give unrelated probes
    base = K.gaussian_probes_reference(SEED, 0, 2, 512, range(8)).double()
    others = [base[1], base[0, :, [1, 2, 3, 4, 5, 6, 7, 0]],
              K.gaussian_probes_reference(SEED, 1, 1, 512, range(8)).double()[0],
              K.gaussian_probes_reference(SEED + 1, 0, 1, 512, range(8)).double()[0]]
    for o in others:
        corr = torch.corrcoef(torch.stack([base[0].flatten(), o.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(base[0].numel())


# ---------------------------------------------------------------------------------------------- kernels
def _check_kernel(a, b, probes, variant, site=3, seed=SEED):
    got = K.randomized_sq_norms(a, b, probes, variant, seed, site, block=BLOCK)
    assert got.dtype == torch.float32 and got.shape == (a.shape[0],)
    want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), probes, variant, seed, site, dtype=torch.float64)
    got = got.cpu().double()
    # same probes: equal up to fp32 products (|.| <= 1e-4 relative here), and the kernel's per-tile rounding-up
    # factor of at most 1 + (64 + 64 + 4) 2^-23 on top
    scale = want.abs() + 1e-6 * (1 + _exact(a.cpu(), b.cpu()))
    assert bool(((got - want) >= -1e-4 * scale).all()), (got, want)
    assert bool(((got - want) <= 1e-4 * scale + 2e-5 * want.abs()).all()), (got, want)
    return got


CASES = [  # B, T, M, N, probes, variant
    (3, 5, 7, 6, 8, "hutchinson"),
    (2, 40, 33, 20, 5, "hutchinson"),
    (1, 1, 3, 4, 1, "hutchinson"),
    (2, 17, 70, 9, 40, "hutchinson"),
    (3, 6, 9, 11, 9, "hutchpp"),
    (2, 33, 20, 40, 13, "hutchpp"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,M,N,probes,variant", CASES)
def test_kernel_matches_reference(B, T, M, N, probes, variant, dtype):
    g = torch.Generator().manual_seed(B * 1000 + T * 100 + M + N)
    a = torch.randn(B, T, M, generator=g).to(DEVICE, dtype)
    b = torch.randn(B, T, N, generator=g).to(DEVICE, dtype)
    _check_kernel(a, b, probes, variant)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(0, 3), T=st.integers(1, 24), M=st.integers(1, 24), N=st.integers(1, 24),
       probes=st.integers(3, 20), variant=st.sampled_from(K.VARIANTS), seed=st.integers(0, 2 ** 63 - 1),
       site=st.integers(0, 2 ** 31 - 1))
def test_kernel_matches_reference_any_shape(B, T, M, N, probes, variant, seed, site):
    g = torch.Generator().manual_seed(seed % 2 ** 32)
    a = torch.randn(B, T, M, generator=g).to(DEVICE)
    b = torch.randn(B, T, N, generator=g).to(DEVICE)
    _check_kernel(a, b, probes, variant, site=site, seed=seed)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(0, 3), M=st.integers(1, 40), N=st.integers(1, 40), probes=st.integers(4, 20),
       variant=st.sampled_from(K.VARIANTS), seed=st.integers(0, 2 ** 63 - 1), transposed=st.booleans())
def test_products_kernel_matches_reference_any_shape(B, M, N, probes, variant, seed, transposed):
    """randomized_stored's estimate (Triton) against the fp64 reference with the same probes, on stored products of
    any shape (B = 0 included), contiguous or a transposed view."""
    g = torch.Generator().manual_seed(seed % 2 ** 32)
    s = torch.randn(B, N, M, generator=g).transpose(1, 2) if transposed else torch.randn(B, M, N, generator=g)
    s = s.to(DEVICE)
    got = K.randomized_sq_norms_of_products(s, probes, variant, seed, 4, block=BLOCK)
    assert got.shape == (B,) and got.dtype == torch.float32
    want = K.randomized_sq_norms_of_products_reference(s.cpu().double(), probes, variant, seed, 4)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-30)


def test_strided_time_major_and_two_dim_sites():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 3, 20, generator=g).to(DEVICE).transpose(0, 1)           # (T, B, d) seen as (B, T, d)
    b = torch.randn(7, 3, 40, generator=g).to(DEVICE)[:, :, ::2].transpose(0, 1)
    for variant in K.VARIANTS:
        _check_kernel(a, b, 9, variant)
        torch.testing.assert_close(K.randomized_sq_norms(a, b, 9, variant, SEED, 3, block=BLOCK),
                                   K.randomized_sq_norms(a.contiguous(), b.contiguous(), 9, variant, SEED, 3,
                                                         block=BLOCK), rtol=1e-6, atol=0)
    # (B, d) operands: T = 1 sites, the same as (B, 1, d)
    x, y = torch.randn(4, 10, generator=g).to(DEVICE), torch.randn(4, 6, generator=g).to(DEVICE)
    two = _check_kernel(x, y, 6, "hutchinson")
    assert torch.equal(two, _check_kernel(x[:, None], y[:, None], 6, "hutchinson"))


def test_empty_and_degenerate_shapes():
    for variant in K.VARIANTS:
        out = K.randomized_sq_norms(torch.zeros(0, 4, 5, device=DEVICE), torch.zeros(0, 4, 3, device=DEVICE), 6,
                                    variant, SEED, 0, block=BLOCK)
        assert out.shape == (0,)
        out = K.randomized_sq_norms(torch.zeros(2, 4, 5, device=DEVICE), torch.ones(2, 4, 3, device=DEVICE), 6,
                                    variant, SEED, 0, block=BLOCK)
        assert torch.equal(out.cpu(), torch.zeros(2))


def test_deterministic_given_seed_and_site():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 9, 12, generator=g).to(DEVICE), torch.randn(3, 9, 10, generator=g).to(DEVICE)
    for variant in K.VARIANTS:
        x = K.randomized_sq_norms(a, b, 9, variant, SEED, 5, block=BLOCK)
        assert torch.equal(x, K.randomized_sq_norms(a, b, 9, variant, torch.tensor([SEED]), 5, block=BLOCK))
        assert not torch.equal(x, K.randomized_sq_norms(a, b, 9, variant, SEED + 1, 5, block=BLOCK))
        assert not torch.equal(x, K.randomized_sq_norms(a, b, 9, variant, SEED, 6, block=BLOCK))
    # each sample has its own probes: identical samples give different estimates
    same = K.randomized_sq_norms(a[:1].expand(3, -1, -1), b[:1].expand(3, -1, -1), 4, "hutchinson", SEED, 0,
                                 block=BLOCK)
    assert len(set(same.tolist())) == 3


# --------------------------------------------------------------------------------------- rounding up
def test_round_up_helpers():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(10_000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (10_000,), generator=g)
    up = K.round_up_f32(x)
    assert up.dtype == torch.float32
    assert bool((up.double() >= x).all())
    below = torch.nextafter(up, torch.full_like(up, -math.inf)).double()
    assert bool((below < x).all())  # the smallest such fp32 value
    exact_f32 = x.float().double()  # values that are fp32 already stay
    assert torch.equal(K.round_up_f32(exact_f32), exact_f32.float())
    # sums that round to nearest would round down: 1 + many halves of an ulp
    terms = torch.cat([torch.ones(1, dtype=torch.float64), torch.full((1000,), 2.0 ** -25, dtype=torch.float64)])
    assert K.sum_up(terms.float().view(1, -1), 1, torch.float32).item() >= 1 + 1000 * 2.0 ** -25
    assert K.scale_up(torch.tensor([1.0], dtype=torch.float64), 3, torch.float32).item() >= 1 / 3


@pytest.mark.parametrize("splits", [1, 2])
def test_sums_of_squares_never_round_down(splits):
    """b = 1 and z zero below its first row: b_i^T z_i is z_i's first row exactly, so the sum of its squares is
    compared against the exact fp64 sum of the squares of fp32 values, built to make round-to-nearest summation
    lose mass; fused into the product kernel (one slice) and by the tile kernel over two slices."""
    g = torch.Generator().manual_seed(5)
    z = torch.zeros(4, 64, 64)
    z[:, 0] = torch.randn(4, 64, generator=g).abs() * 2.0 ** -12
    z[:, 0, 0] = 1.0                                   # one large term, then many terms below its half ulp
    z[1, 0] = torch.rand(64, generator=g) + 1.0        # values in [1, 2): squares need more than 24 bits
    z = z.to(DEVICE)
    b = torch.ones(4, 64, 48, device=DEVICE)
    got = K._bt_z_sq_norms(b, z, lambda k: k, BLOCK, splits=splits).cpu()
    assert got.dtype == torch.float64
    exact = (b.cpu().double().transpose(1, 2) @ z.cpu().double()).pow(2).sum((1, 2))
    assert bool((got >= exact).all())
    assert bool((got <= exact * (1 + 300 * 2.0 ** -23)).all())


@pytest.mark.parametrize("variant", K.VARIANTS)
def test_row_slices_add_up_to_one_pass(variant):
    """Split-T: b_i^T z_i summed over slices of the rows equals the one-slice product up to fp32 addition order
    (the slices' partial products are added in a fixed order, so a second call is bit-identical)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 150, 20, generator=g).to(DEVICE)
    b = torch.randn(2, 150, 36, generator=g).to(DEVICE)
    one = K.randomized_sq_norms(a, b, 9, variant, SEED, 2, block=BLOCK, splits=1)
    parts = K._bt_z_launch(b, a[..., :9].float(), lambda k: k, BLOCK, "tensor_cores", 3, squares=False)
    assert parts.shape == (2, 3, 36, 9)
    sliced = K.randomized_sq_norms(a, b, 9, variant, SEED, 2, block=BLOCK, splits=3)
    torch.testing.assert_close(sliced, one, rtol=1e-5, atol=0)
    assert torch.equal(sliced, K.randomized_sq_norms(a, b, 9, variant, SEED, 2, block=BLOCK, splits=3))
    assert not torch.equal(parts[:, 0], parts[:, 1])  # every slice did its own rows


@pytest.mark.parametrize("nparts", [1, 3])
def test_split3_terms_add_up_to_z_exactly(nparts):
    """The bf16 terms b^T z takes for bf16 data: hi + mid + lo equals, exactly, the fp32 sum of the projection's
    column-slice partials added in slice order, with each term below one bf16 ulp of the previous one (the GPU
    rounds to nearest, the interpreter truncates: both split exactly). Products of bf16 b with the terms are exact."""
    g = torch.Generator().manual_seed(13)
    parts = (torch.randn(nparts, 2, 37, 9, generator=g) * 10.0 ** torch.randint(-20, 20, (nparts, 2, 37, 9),
                                                                              generator=g)).to(DEVICE)
    planes = K._split3(parts, lambda k: k).cpu()
    assert planes.shape == (3, 2, 37, 9) and planes.dtype == torch.bfloat16
    z = parts.cpu()[0].clone()
    for s in range(1, nparts):
        z += parts.cpu()[s]
    assert torch.equal(planes.double().sum(0), z.double())
    for big, small in ((planes[0], planes[1]), (planes[1], planes[2])):
        assert bool((small.double().abs() <= big.double().abs() * 2.0 ** -7).all())


@pytest.mark.parametrize("k", [9, 40])
def test_presplit_terms_in_three_dots(k):
    """b^T z from Z's terms as _split3 lays them out (a row's terms side by side), by three dots (SPLIT_Z), over two
    row slices and, at k=40, two K tiles. fp16 terms stand in for bf16 ones here (the interpreter has no bf16 dot;
    the GPU tests run bf16)."""
    g = torch.Generator().manual_seed(14)
    B, T, N = 2, 100, 40
    b = torch.randn(B, T, N, generator=g).half().to(DEVICE)
    terms = torch.randn(B, T, 3, k, generator=g).half() * torch.tensor([1.0, 2 ** -4, 2 ** -8]).half()[:, None]
    z = terms.to(DEVICE).permute(2, 0, 1, 3)
    want = b.cpu().double().transpose(1, 2) @ terms.double().sum(2)
    bt, bn = (BLOCK or 64), (BLOCK or 64)
    bk = K._pow2(k, 16, BLOCK or 64)
    tiles_k = K._cdiv(k, bk)
    tiles = K._cdiv(N, bn) * tiles_k
    rows = K._cdiv(K._cdiv(T, 2), bt) * bt
    out = torch.empty(B, 2, N, k, device=DEVICE)
    K._bt_z_kernel[(B, tiles, 2)](b, z, out, T, N, k, rows, *b.stride(), *z.stride(), *out.stride(), tiles_k,
                                  tiles, PRECISION="bf16x3", SQUARES=False, SPLIT_Z=True, BLOCK_T=bt, BLOCK_N=bn,
                                  BLOCK_K=bk)
    torch.testing.assert_close(out.sum(1).cpu().double(), want, rtol=1e-5, atol=1e-4)


def test_row_slices_only_where_they_pay():
    """Split-T only while the grid has few programs (so the slices' products stay within _TARGET_PROGRAMS tiles),
    at least 512 rows per slice, and never on a symbolic batch or length (no guard)."""
    assert K._splits(2, 16384, 6, 64, None) == 32            # narrow site, long T: 512-row slices
    assert K._splits(2, 1024, 6, 64, None) == 2
    assert K._splits(64, 1024, 18, 64, None) == 1            # enough programs already
    assert K._splits(2, 16384, 24, 64, None) == 11           # 3072 columns: about 512 programs (sweep, run 20)
    assert K._splits(2, 16384, 393, 64, None) == 1           # gpt2 lm_head: 393 tiles of 128 x 32 per sample
    assert K._splits(8, 16384, 393, 64, None) == 1
    sym = torch.fx.experimental.symbolic_shapes.ShapeEnv().create_unbacked_symint()
    assert K._splits(sym, 16384, 6, 64, None) == 1 and K._splits(2, sym, 6, 64, None) == 1


@pytest.mark.parametrize("variant", K.VARIANTS)
def test_column_slices_add_up_to_one_pass(variant):
    """Split-M: Z = a_i V summed over slices of a_i's columns equals the one-slice projection up to fp32 addition
    order, with the same probes (each slice draws the rows of V for its own columns), bit-identical on a repeat."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(2, 70, 100, generator=g).to(DEVICE)  # 4 column tiles of 32 under the interpreter
    b = torch.randn(2, 70, 120, generator=g).to(DEVICE)
    seed = torch.tensor([SEED], device=DEVICE)
    one = K._project(a, seed, 2, 0, 9, lambda k: k, BLOCK, col_splits=1)
    sliced = K._project(a, seed, 2, 0, 9, lambda k: k, BLOCK, col_splits=3)  # 64 + 36 columns
    want = torch.bmm(a.double(), K.gaussian_probes_reference(SEED, 2, 2, 100, range(9), DEVICE).double())
    torch.testing.assert_close(one.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sliced, one, rtol=1e-5, atol=1e-5)
    assert torch.equal(sliced, K._project(a, seed, 2, 0, 9, lambda k: k, BLOCK, col_splits=3))
    est = K.randomized_sq_norms(a, b, 9, variant, SEED, 2, block=BLOCK, col_splits=3)
    torch.testing.assert_close(est, K.randomized_sq_norms(a, b, 9, variant, SEED, 2, block=BLOCK, col_splits=1),
                               rtol=1e-5, atol=0)


def _backed_symint(value: int):
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    return env.create_symintnode(env.create_symbol(value, ConstantSource("B")), hint=value)


def test_column_slices_only_where_they_pay():
    """Split-M only while (sample, row-tile) programs are fewer than _PROJECT_PROGRAMS, in whole BLOCK_M tiles,
    with partials under half the bytes of the bf16 operand; a dynamic batch counts with its hint (no guard), an
    unbacked one not at all."""
    bt, bm = K._PROJECT_ROWS, 64
    assert K._col_splits(2, 16384, 768, bt, bm, 32, 1, None) == K._cdiv(K._PROJECT_PROGRAMS, 2 * 16384 // bt) == 4
    assert K._col_splits(2, 16384, 2048, bt, bm, 32, 1, None) == 4
    assert K._col_splits(2, 16384, 256, bt, bm, 32, 1, None) == 2   # 256 // (4 * 32): partials <= a / 2
    assert K._col_splits(2, 16384, 256, bt, bm, 64, 1, None) == 1
    assert K._col_splits(2, 4096, 768, bt, bm, 32, 1, None) == 6    # not 16: capped by the bytes of a
    assert K._col_splits(64, 4096, 768, bt, bm, 32, 1, None) == 1   # enough programs already
    assert K._col_splits(2, 16384, 768, bt, bm, 32, 1, 100) == 12   # asked for: at most one slice per column tile
    B = _backed_symint(2)
    assert K._col_splits(B, 16384, 768, bt, bm, 32, 1, None) == 4
    assert K._splits(B, 16384, 6, 64, None) == K._splits(2, 16384, 6, 64, None) == 32
    assert not B.node.shape_env.guards  # read without a guard
    sym = torch.fx.experimental.symbolic_shapes.ShapeEnv().create_unbacked_symint()
    assert K._col_splits(sym, 16384, 768, bt, bm, 32, 1, None) == 1


def test_unknown_precision_variant_and_fp64_are_refused_by_both_kernel_entry_points():
    a = torch.randn(1, 3, 4, device=DEVICE)
    s = torch.randn(1, 4, 4, device=DEVICE)
    for call in (lambda x, **kw: K.randomized_sq_norms(x, x, 4, seed=SEED, block=BLOCK, **kw),
                 lambda x, **kw: K.randomized_sq_norms_of_products(x.transpose(1, 2) @ x, 4, seed=SEED, block=BLOCK,
                                                                   **kw)):
        with pytest.raises(ValueError, match="precision='tf32'"):
            call(a, precision="tf32")
        with pytest.raises(ValueError):
            call(a, variant="rademacher")
        with pytest.raises(TypeError, match="fp64 uses the reference"):
            call(a.double())
    with pytest.raises(ValueError, match=r"\(B, M, N\)"):
        K.randomized_sq_norms_of_products(s[0], 4, seed=SEED)



# ------------------------------------------------------------------------------------ estimator statistics
def _replicates(a1, b1, reps, probes, variant, seed):
    """`reps` independent estimates for one sample (a1 (T, M), b1 (T, N)): a batch of copies, each with its own
    probes. Through the reference, which the tests above tie to the kernels."""
    a = a1.expand(reps, *a1.shape)
    b = b1.expand(reps, *b1.shape)
    return K.randomized_sq_norms_reference(a, b, probes, variant, seed, 0, dtype=torch.float64)


def _moments_check(est, n, tr_m2, tr_m4, probes):
    """Mean n and variance 2 tr(M^2) / k of Hutchinson's estimate (M = s s^T, tr M = n), within 5 standard errors.

    Cumulants of v^T M v (v ~ N(0, I)): k_r = 2^(r-1) (r-1)! tr(M^r); the mean of k probes has k_2 = 2 tr(M^2)/k,
    k_4 = 48 tr(M^4)/k^3, so Var(sample variance) ~= (k_4 + 2 k_2^2) / reps."""
    reps = est.numel()
    k2 = 2 * tr_m2 / probes
    k4 = 48 * tr_m4 / probes ** 3
    mean, var = est.mean().item(), est.var().item()
    assert abs(mean - n) <= 5 * math.sqrt(k2 / reps), (mean, n, math.sqrt(k2 / reps))
    assert abs(var - k2) <= 5 * math.sqrt((k4 + 2 * k2 ** 2) / reps), (var, k2)


@pytest.mark.parametrize("rank", [1, None])
@pytest.mark.parametrize("probes", [1, 8])
def test_hutchinson_unbiased_with_the_predicted_variance(rank, probes):
    g = torch.Generator().manual_seed(11 + probes)
    T, M, N = 6, 9, 7
    if rank == 1:  # the worst case: Var = 2 n^2 / k
        a1 = torch.randn(T, 1, generator=g, dtype=torch.float64) @ torch.randn(1, M, generator=g, dtype=torch.float64)
    else:
        a1 = torch.randn(T, M, generator=g, dtype=torch.float64)
    b1 = torch.randn(T, N, generator=g, dtype=torch.float64)
    s = a1.T @ b1
    mm = s @ s.T
    n = torch.trace(mm).item()
    tr_m2 = torch.trace(mm @ mm).item()
    tr_m4 = torch.trace(torch.linalg.matrix_power(mm, 4)).item()
    if rank == 1:
        assert tr_m2 == pytest.approx(n ** 2)
    est = _replicates(a1, b1, 20_000, probes, "hutchinson", SEED + probes)
    _moments_check(est, n, tr_m2, tr_m4, probes)


def test_rank_one_ratio_is_chi_square():
    """For a rank-one per-sample gradient est / n ~ chi^2_k / k exactly: the law the accountant's envelope uses."""
    g = torch.Generator().manual_seed(12)
    a1 = torch.randn(5, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 8, generator=g, dtype=torch.float64)
    b1 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    k = 6
    ratio = (_replicates(a1, b1, 20_000, k, "hutchinson", SEED) / _exact(a1[None], b1[None])).numpy()
    assert stats.kstest(ratio, stats.chi2(k, scale=1 / k).cdf).pvalue > 1e-4


def test_hutchpp_is_unbiased():
    g = torch.Generator().manual_seed(13)
    a1, b1 = torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(12, 9, generator=g, dtype=torch.float64)
    probes = 9  # 3 sketch probes < rank 9: the residual is estimated
    est = _replicates(a1, b1, 10_000, probes, "hutchpp", SEED)
    n = _exact(a1[None], b1[None]).item()
    # Var(est) <= Var(Hutchinson with the 3 residual probes on the whole matrix) <= 2 n^2 / 3
    assert abs(est.mean().item() - n) <= 5 * math.sqrt(2 * n ** 2 / 3 / est.numel())
    assert est.var().item() < 2 * n ** 2 / 3
    # and it beats Hutchinson with the same 9 products on this spectrum
    assert est.var().item() < _replicates(a1, b1, 10_000, probes, "hutchinson", SEED).var().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank,probes", [(1, 3), (2, 6), (4, 12), (3, 14)])
def test_hutchpp_exact_on_low_rank(rank, probes, dtype):
    g = torch.Generator().manual_seed(rank * 100 + probes)
    a, b = _low_rank(3, 20, 24, 18, rank, g, dtype)
    exact = _exact(a.cpu(), b.cpu())
    for seed in (SEED, 1):
        got = K.randomized_sq_norms(a, b, probes, "hutchpp", seed, 0, block=BLOCK).cpu().double()
        ref = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), probes, "hutchpp", seed, 0, dtype=torch.float64)
        torch.testing.assert_close(ref, exact, rtol=1e-9, atol=0)
        torch.testing.assert_close(got, exact, rtol=2e-4, atol=0)


def test_hutchpp_split():
    for k in range(3, 100):
        s, h = K.hutchpp_split(k)
        assert 2 * s + h == k and s == k // 3 and h >= k // 3
        assert RA.accounting_probes(k, "hutchpp") == h
    with pytest.raises(ValueError):
        K.hutchpp_split(2)


# --------------------------------------------------------------------------------------------------- ops
def test_probe_seed_op():
    x = torch.zeros(2, device=DEVICE)
    seeds = {torch.ops.dpcompile.probe_seed(x, 8, "hutchinson").item() for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2 ** 63 for s in seeds)
    assert RA.take_randomized_use() == (8, True) and RA.take_randomized_use() is None
    torch.ops.dpcompile.probe_seed(x, 32, "hutchinson")
    torch.ops.dpcompile.probe_seed(x, 12, "hutchpp")
    assert RA.take_randomized_use() == (4, True)  # the smallest effective count: 12 - 2 * 4; 32 = 8 * 4
    torch.ops.dpcompile.probe_seed(x, 32, "hutchinson")
    torch.ops.dpcompile.probe_seed(x, 15, "hutchpp")
    assert RA.take_randomized_use() == (5, False)
    RO.manual_probe_seed(7)
    first = [torch.ops.dpcompile.probe_seed(x, 8, "hutchinson").item() for _ in range(3)]
    RO.manual_probe_seed(7)
    assert first == [torch.ops.dpcompile.probe_seed(x, 8, "hutchinson").item() for _ in range(3)]
    seed = torch.ops.dpcompile.probe_seed(x, 8, "hutchinson")
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device == x.device
    with pytest.raises(ValueError):
        torch.ops.dpcompile.probe_seed(x, 0, "hutchinson")
    with pytest.raises(ValueError):
        torch.ops.dpcompile.probe_seed(x, 8, "rademacher")


def test_linear_norm_randomized_op_and_exact_hook():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 7, 10, generator=g).to(DEVICE), torch.randn(3, 7, 5, generator=g).to(DEVICE)
    seed = torch.tensor([SEED], device=DEVICE)
    for variant in K.VARIANTS:
        got = torch.ops.dpcompile.linear_norm_randomized(a, b, 9, variant, seed, 4)
        want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 9, variant, SEED, 4, dtype=torch.float64)
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=0)
    with RO.exact_norms():
        got = torch.ops.dpcompile.linear_norm_randomized(a, b, 9, "hutchinson", seed, 4)
    torch.testing.assert_close(got.cpu().double(), _exact(a.cpu(), b.cpu()), rtol=1e-5, atol=0)
    assert not RO.exact_norms_enabled()
    # fp64 data: the reference in fp64
    out = torch.ops.dpcompile.linear_norm_randomized(a.double(), b.double(), 9, "hutchinson", seed, 4)
    assert out.dtype == torch.float64
    with pytest.raises(ValueError):
        torch.ops.dpcompile.linear_norm_randomized(a, b, 9, "rademacher", seed, 4)
    with pytest.raises(ValueError):
        torch.ops.dpcompile.linear_norm_randomized(a, b, 9, "hutchinson", seed, -1)


def test_ops_trace_and_compile():
    """Fake tensors (no data-dependent seed), and a compiled graph drawing a fresh seed per call."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 5, 6, generator=g).to(DEVICE), torch.randn(2, 5, 4, generator=g).to(DEVICE)

    def f(a, b):
        seed = torch.ops.dpcompile.probe_seed(a, 8, "hutchinson")
        return (torch.ops.dpcompile.linear_norm_randomized(a, b, 8, "hutchinson", seed, 0)
                + torch.ops.dpcompile.linear_norm_randomized(a, b, 8, "hutchinson", seed, 1)), seed

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    (x, s1), (y, s2) = cf(a, b), cf(a, b)
    assert s1.item() != s2.item() and not torch.equal(x, y)
    want = sum(K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 8, "hutchinson", s1.cpu(), site, dtype=torch.float64)
               for site in (0, 1))
    torch.testing.assert_close(x.cpu().double(), want, rtol=1e-4, atol=0)
    assert RA.take_randomized_use() == (8, True)


def test_exact_hook_gives_the_exact_clipped_gradient():
    """Norms from the randomized op under exact_norms() -> clip factors -> clipped sum equal the exact path.
    (The full-model version belongs with the planner's wiring of the strategy.)"""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 6, 8, generator=g).to(DEVICE), torch.randn(4, 6, 5, generator=g).to(DEVICE)
    seed = torch.ops.dpcompile.probe_seed(a, 16, "hutchpp")
    C = 1.5

    def clipped(norms):
        coef = (C / (norms.sqrt() + 1e-6)).clamp(max=1.0)
        return linear_clipped_sum_reference(a, b, coef)

    with RO.exact_norms():
        got = clipped(torch.ops.dpcompile.linear_norm_randomized(a, b, 16, "hutchpp", seed, 0))
    want = clipped(linear_norm_reference(a, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and without the hook the estimate really differs (the hook is what makes them equal)
    est = torch.ops.dpcompile.linear_norm_randomized(a, b, 4, "hutchinson", seed, 0)
    assert not torch.allclose(est, linear_norm_reference(a, b), rtol=1e-3)


# --------------------------------------------------------------------------------------------- accounting
def _cdf_two(r, w, k):
    """P(w Y1 + (1 - w) Y2 <= r), Y ~ chi^2_k / k, by quadrature."""
    Y = stats.gamma(a=k / 2, scale=2 / k)
    val, _ = integrate.quad(lambda y: Y.pdf(y) * Y.cdf((r - w * y) / (1 - w)), 0, r / w, limit=200, epsrel=1e-11,
                            epsabs=0)
    return val


@pytest.mark.parametrize("k", [2, 4, 12, 32])
def test_rank_one_envelope_dominates(k):
    """Numerical check of the chi2 envelope: weighted sums of iid chi^2_k / k have lower tails below the rank-one
    one on (0, 1] (unique crossing reduces it to r = 1; checked on a grid too), and the equal-weight extreme."""
    F = lambda r: float(RA.envelope_cdf(r, k, "chi2"))  # noqa: E731
    for w in (0.99, 0.9, 0.75, 0.6, 0.5):
        for r in (0.2, 0.5, 0.8, 0.95, 1.0):
            assert _cdf_two(r, w, k) <= F(r) * (1 + 1e-9), (w, r)
    for n in (2, 3, 10, 100):  # w = 1/n: chi^2_{nk} / (nk)
        assert stats.chi2(n * k, scale=1 / (n * k)).cdf(1.0) <= F(1.0)
    # Chernoff is a bound of the rank-one law itself
    r = np.linspace(0.01, 1, 100)
    assert np.all(RA.envelope_cdf(r, k, "chernoff") >= RA.envelope_cdf(r, k, "chi2"))


@pytest.mark.parametrize("envelope", RA.ENVELOPES)
@pytest.mark.parametrize("probes", [12, 32])
def test_sensitivity_law_dominates_the_envelope(probes, envelope):
    tau = 1e-9
    s, p = RA.sensitivity_law(RA.RandomizedSpec(probes, envelope=envelope), tau)
    assert p.sum() == pytest.approx(1, abs=1e-12) and bool((p > 0).all()) and s.min() >= 1
    assert len(s) <= RA.GEOMETRIC_BINS + RA.QUANTILE_BINS + 2
    # P(S >= x) of the law >= P(1/sqrt(R) >= x | R >= r_min) <= F(1/x^2) / (1 - tau), for x > 1
    x = np.linspace(1.0001, s.max(), 400)
    ccdf = np.array([p[s >= xi].sum() for xi in x])
    cond = np.minimum(1, RA.envelope_cdf(1 / x ** 2, probes, envelope) / (1 - tau))
    assert np.all(ccdf >= cond - 1e-12)
    # the cut-off: the largest sensitivity is 1 / sqrt(r_min), F(r_min) = tau
    assert float(RA.envelope_cdf(1 / s.max() ** 2, probes, envelope)) == pytest.approx(tau, rel=1e-6)


def test_per_layer_law():
    """Groups: S^2 = sum_g w_g / min(R_g, 1). Its mean is the one-group mean whatever the split (law rounded up:
    never below it), and it concentrates as groups are added."""
    tau = 1e-9
    flat_s, flat_p = RA.sensitivity_law(RA.RandomizedSpec(32), tau)
    one = RA.RandomizedSpec(32, (1.0,))
    for spec in (one, RA.RandomizedSpec(32, (0.5, 0.5)), RA.RandomizedSpec(32, (0.25,) * 4),
                 RA.RandomizedSpec(32, (0.1,) * 6 + (0.2,)), RA.RandomizedSpec(32, (1 / 64,) * 64)):
        s, p = RA.sensitivity_law(spec, tau)
        assert p.sum() == pytest.approx(1, abs=1e-12) and s.min() >= 1
        # mean of S^2 per group, at the union-bounded tail of that group
        g = len(spec.group_weights)
        gs, gp = RA._group_law(32, tau / g, "chi2")
        mean = sum(spec.group_weights) * (gp * gs).sum() + (1 - sum(spec.group_weights))
        assert (p * s ** 2).sum() >= mean * (1 - 1e-12)
        assert (p * s ** 2).sum() <= mean * (1 + 5e-3)   # rounding up costs little
    assert RA.sensitivity_law(RA.RandomizedSpec(32, (1 / 64,) * 64), tau)[0].max() < flat_s.max()
    assert RA.RandomizedSpec.make(32, group_weights=[1.0]) == RA.RandomizedSpec(32)
    with pytest.raises(ValueError):
        RA.RandomizedSpec(32, (0.7, 0.7))
    with pytest.raises(ValueError):
        RA.sensitivity_law(RA.RandomizedSpec(3), tau)  # too few probes for the cut-off: refused, not slow


Q, STEPS, DELTA = 0.01, 1000, 1e-5
VDI = 2e-3


def test_epsilon_decreases_in_probes_towards_deterministic():
    vdi = 5e-3  # coarse and pessimistic, the same for all: measured det 1.846; k = 16: 2.513, 32: 2.164,
    #             128: 1.966, 2048: 1.872 (at 2e-3: 1.831; 2.503, 2.151, 1.952, 1.857: the gap shrinks like 1/sqrt(k))
    det = get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=vdi)
    eps = [get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=vdi, probes=k) for k in (16, 32, 128, 2048)]
    assert eps[0] > eps[1] > eps[2] > eps[3] > det
    assert eps[3] <= det * 1.02   # many probes: (almost) the deterministic ε
    assert eps[1] == pytest.approx(2.15, rel=0.02)   # research note: 2.17 at k = 32 with coarser bins
    # Hutch++ is accounted with its residual probes; the Chernoff envelope is looser
    assert get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=vdi, probes=48, variant="hutchpp") == eps[0]
    assert get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=vdi, probes=32,
                       envelope="chernoff") > eps[1]


def test_sigma_at_32_probes_within_10_percent():
    """Target setting: q = 0.01, 1000 steps, δ = 1e-5, ε = 8. docs/randomized.md: σ_det = 0.587,
    σ(k=32) = 0.638 (x1.088)."""
    sigma_det = get_noise_multiplier(8.0, DELTA, Q, STEPS, value_discretization_interval=1e-3,
                                     epsilon_tolerance=0.003)
    assert sigma_det == pytest.approx(0.587, rel=0.01)
    rc = lambda s: get_epsilon(s, Q, STEPS, DELTA, value_discretization_interval=1e-3, probes=32)  # noqa: E731
    assert rc(1.10 * sigma_det) <= 8.0
    assert rc(1.05 * sigma_det) > 8.0   # and randomization is not free


def test_accountant_records_randomized_steps():
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    acc.step(noise_multiplier=1.0, sample_rate=Q, num_steps=600)
    acc.step(noise_multiplier=1.0, sample_rate=Q, num_steps=300, probes=32)
    acc.step(noise_multiplier=1.0, sample_rate=Q, num_steps=100, probes=32)
    spec = RA.RandomizedSpec(32)
    assert acc.history == [(1.0, Q, 600), (1.0, Q, 400, spec)] and acc.steps == 1000
    eps = acc.get_epsilon(DELTA)
    det = get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=VDI)
    full = get_epsilon(1.0, Q, STEPS, DELTA, value_discretization_interval=VDI, probes=32)
    assert det < eps < full
    # checkpoints
    other = PrivacyAccountant()
    other.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert other.history == acc.history and other.get_epsilon(DELTA) == eps
    with pytest.raises(ValueError, match="PLD"):
        get_epsilon(1.0, Q, 10, DELTA, "rdp", probes=32)


def test_accountant_refuses_gaussian_epsilon_after_randomized_norms():
    x = torch.zeros(1)
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    acc.step(noise_multiplier=1.0, sample_rate=Q)                 # exact norms: fine
    assert acc.get_epsilon(DELTA) > 0
    torch.ops.dpcompile.probe_seed(x, 32, "hutchinson")           # the kernels ran randomized norms ...
    acc.step(noise_multiplier=1.0, sample_rate=Q)                 # ... and the step did not say so
    assert acc.unaccounted_randomized_steps == 1
    with pytest.raises(RandomizedAccountingError, match="probes="):
        acc.get_epsilon(DELTA)
    state = json.loads(json.dumps(acc.state_dict()))
    other = PrivacyAccountant()
    other.load_state_dict(state)
    with pytest.raises(RandomizedAccountingError):
        other.get_epsilon(DELTA)
    # told, but with more probes than ran: the smaller count is accounted
    acc2 = PrivacyAccountant(value_discretization_interval=VDI)
    torch.ops.dpcompile.probe_seed(x, 16, "hutchinson")
    acc2.step(noise_multiplier=1.0, sample_rate=Q, probes=64)
    assert acc2.history == [(1.0, Q, 1, RA.RandomizedSpec(16))]
    # counts outside the chi2 envelope's argument (not multiples of the smallest): the Chernoff envelope
    torch.ops.dpcompile.probe_seed(x, 24, "hutchinson")
    torch.ops.dpcompile.probe_seed(x, 36, "hutchinson")
    acc2.step(noise_multiplier=1.0, sample_rate=Q, probes=24)
    assert acc2.history[-1] == (1.0, Q, 1, RA.RandomizedSpec(24, envelope="chernoff"))
    with pytest.raises(ValueError, match="probes"):
        acc2.step(noise_multiplier=1.0, sample_rate=Q, group_weights=[0.5])


# ---------------------------------------------------------------------------- wiring: compiled graphs, optimizer
def _family(name):
    import models

    return models.gpt_like(n_layer=1, tied=True) if name == "gpt" else models.llama_like(n_layer=1)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("budget_mb", [None, 1e-4])
def test_randomized_strategy_with_exact_norms_matches_the_oracle(family, clipping, budget_mb):
    """strategy='randomized' through dpcompile.compile, with the estimates replaced by exact norms (the hook is read
    when the graph is built and when the op runs: compile and run inside the block), equals the float64 oracle;
    with the clipped sums of two_pass (products within the budget) and of our GEMM (a budget nothing fits)."""
    from dp_check import assert_matches

    case = _family(family)
    budget = {} if budget_mb is None else {"single_pass_budget_mb": budget_mb}
    with RO.exact_norms():
        assert_matches(case, case.batch(3, seed=1), max_grad_norm=0.05, clipping=clipping, strategy="randomized",
                       loss_reduction="mean", **budget)
        assert RA.take_randomized_use() == (32, True)  # the randomized ops ran (one seed per call)
        if family == "gpt" and clipping == "per_layer":  # a batch of one: its own graph, estimating too
            assert_matches(case, case.batch(1, seed=2), max_grad_norm=0.05, clipping=clipping,
                           strategy="randomized", probes=12, probe_variant="hutchpp", loss_reduction="mean")
            assert RA.take_randomized_use() == (4, True)


class _Bilinear(torch.nn.Module):
    """loss = sum_i <lin(x_i), w_i>: the output gradient of sample i is w_i, its weight gradient w_i^T x_i."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4, bias=False)

    def forward(self, x, w):
        return (self.lin(x) * w).sum()


@pytest.mark.parametrize("budget_mb", [None, 1e-4])
def test_clip_factors_come_from_the_estimates_with_fresh_seeds(budget_mb):
    """The clip factors are the site's estimates with the call's seed: taken from the stored per-sample products
    (default budget; M N <= T (M + N) here) or from the rows (a budget nothing fits), the same values."""
    import dpcompile

    g = torch.Generator().manual_seed(12)
    B, T, C, k = 4, 5, 0.3, 8
    x, w = torch.randn(B, T, 6, generator=g, dtype=torch.float64), torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    model = _Bilinear().double()
    budget = {} if budget_mb is None else {"single_pass_budget_mb": budget_mb}
    plan = dpcompile.explain(model, (x, w), loss_reduction="sum", clipping="flat", strategy="randomized", probes=k,
                             **budget)
    assert plan.rows[0]["strategy"] == ("randomized" if budget else "randomized_stored")
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", clipping="flat",
                                 max_grad_norm=C, strategy="randomized", probes=k, **budget)

    def grad(xb, wb, seed):
        RO.manual_probe_seed(seed)
        model.lin.weight.grad = None
        compiled(xb, wb).backward()
        return model.lin.weight.grad.clone()

    def expected(est, xb, wb):
        coef = (C / (est.sqrt() + 1e-6)).clamp(max=1.0)
        return torch.einsum("i,itn,itm->nm", coef, wb, xb)

    RO.manual_probe_seed(5)
    seed = RO.next_probe_seed()  # the seed the graph's first call draws after manual_probe_seed(5)
    got = grad(x, w, 5)
    # the site's operands as the weight-gradient mm has them: dY^T X, so a = w (probes over the outputs), b = x
    est = K.randomized_sq_norms_reference(w, x, k, "hutchinson", seed, 0)
    assert not torch.allclose(est, _exact(x, w), rtol=1e-2)  # really an estimate
    torch.testing.assert_close(got, expected(est, x, w), rtol=1e-10, atol=1e-12)
    assert torch.equal(grad(x, w, 5), got)                      # a fixed seed: the same gradient
    fresh = [grad(x, w, None), grad(x, w, None)]                # OS-entropy seeds: fresh probes every call
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], got)
    # a batch of one: the sample's product s_0 (the weight gradient's mm, (out, in)) gets the same estimator
    RO.manual_probe_seed(6)
    seed = RO.next_probe_seed()
    got = grad(x[:1], w[:1], 6)
    est = K.randomized_sq_norms_of_products_reference(torch.einsum("tn,tm->nm", w[0], x[0])[None], k, "hutchinson",
                                                      seed, 0)
    torch.testing.assert_close(got, expected(est, x[:1], w[:1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_hutchpp_from_products_or_rows_alike(clipping):
    """Hutch++ through dpcompile.compile: a seed gives the same clipped gradient whether the site is estimated from
    its stored products or from its rows (fp64, so only rounding apart), and it is an estimate, not the exact one."""
    import dpcompile

    g = torch.Generator().manual_seed(15)
    x = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    grads = []
    for budget in ({}, {"single_pass_budget_mb": 1e-4}, "exact"):
        model = _Bilinear().double()
        torch._dynamo.reset()
        opts = {} if budget == "exact" else dict(strategy="randomized", probes=6, probe_variant="hutchpp", **budget)
        compiled = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", clipping=clipping,
                                     max_grad_norm=0.05, **opts)
        RO.manual_probe_seed(9)
        compiled(x, w).backward()
        grads.append(model.lin.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grads[0], grads[2], rtol=1e-3)  # rank 4 > 6 // 3: Hutch++ is not exact here


def test_products_estimator_is_the_linear_one_with_identity_activations():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    for variant in K.VARIANTS:
        got = K.randomized_sq_norms_of_products_reference(s, 9, variant, SEED, 3)
        want = K.randomized_sq_norms_reference(eye, s, 9, variant, SEED, 3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        op = torch.ops.dpcompile.persample_norm_randomized(s, 9, variant, torch.tensor([SEED]), 3)
        torch.testing.assert_close(op, want, rtol=1e-12, atol=0)
    with RO.exact_norms():
        op = torch.ops.dpcompile.persample_norm_randomized(s, 9, "hutchinson", torch.tensor([SEED]), 3)
    torch.testing.assert_close(op, s.pow(2).sum((1, 2)), rtol=1e-12, atol=0)


def test_one_row_per_sample_sites_are_refused():
    import dpcompile
    from dp_check import unwrap

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    for B in (3, 1):
        torch._dynamo.reset()
        with pytest.raises(Exception) as info:
            dpcompile.compile(model, backend="flashdp_eager", strategy="randomized")(torch.randn(B, 3)).sum().backward()
        err = unwrap(info.value)
        assert isinstance(err, dpcompile.OptionsError) and "`0.weight`" in str(err) and "T = 1" in str(err), err


def test_batch_one_graph_must_agree_with_the_batched_one(monkeypatch):
    """The safety net: a batch-size-1 graph that does not randomize a site the batched graph randomizes (or the
    other way round) is refused when the second of them compiles."""
    import dpcompile
    import dpcompile.passes as passes
    from dp_check import unwrap

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", strategy={"2.*": "randomized"}, loss_reduction="sum")
    compiled(torch.randn(3, 5, 3)).sum().backward()
    monkeypatch.setattr(passes.one_sample, "randomized_products", lambda *a: {})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(1, 5, 3)).sum().backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.DPCompileError) and "`2.weight`" in str(err) and "estimates it" in str(err), err


def _randomized_step(clipping, accountant, probes=32, **opt_kwargs):
    import dpcompile

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", strategy="randomized", clipping=clipping,
                                 probes=probes, loss_reduction="sum")
    compiled(torch.randn(3, 5, 3)).sum().backward()
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                max_grad_norm=1.0, expected_batch_size=3.0, loss_reduction="sum",
                                accountant=accountant, sample_rate=Q if accountant is not None else None,
                                **opt_kwargs)
    return model, compiled, opt


def test_optimizer_accounts_randomized_steps():
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    _, _, opt = _randomized_step("flat", acc)
    assert opt.randomized_norms == {"probes": 32, "variant": "hutchinson", "group_weights": None}
    opt.step()
    assert acc.history == [(1.0, Q, 1, RA.RandomizedSpec(32))] and acc.unaccounted_randomized_steps == 0
    eps = opt.get_epsilon(DELTA)
    assert eps == get_epsilon(1.0, Q, 1, DELTA, value_discretization_interval=VDI, probes=32)
    assert eps > get_epsilon(1.0, Q, 1, DELTA, value_discretization_interval=VDI)  # the estimates cost epsilon
    # per-layer clipping: each randomized group's C_g^2 / C^2 (two linear layers: 1/2 each)
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    _, _, opt = _randomized_step("per_layer", acc, probes=16)
    spec = opt.randomized_norms
    assert spec["probes"] == 16 and spec["group_weights"] == pytest.approx([0.5, 0.5])
    opt.step()
    (entry,) = acc.history
    assert entry[3].probes == 16 and entry[3].group_weights == pytest.approx((0.5, 0.5))


def test_randomized_steps_the_optimizer_cannot_account_are_refused():
    import dpcompile

    # a plain accountant step after randomized norms ran: epsilon refused
    _randomized_step("flat", None)
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    acc.step(noise_multiplier=1.0, sample_rate=Q)
    with pytest.raises(RandomizedAccountingError):
        acc.get_epsilon(DELTA)
    # the RDP accountant has no bound for them: refused before any noise
    model, _, opt = _randomized_step("flat", PrivacyAccountant("rdp"))
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(dpcompile.DPCompileError, match="PLD"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # randomized norms ran, but this optimizer's parameters were clipped exactly: it cannot account them
    RA.take_randomized_use()
    _randomized_step("flat", None)
    other = torch.nn.Linear(3, 2)
    torch._dynamo.reset()
    dpcompile.compile(other, backend="flashdp_eager", loss_reduction="sum")(torch.randn(2, 3)).sum().backward()
    opt = dpcompile.DPOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=2.0, accountant=PrivacyAccountant(), sample_rate=Q)
    with pytest.raises(dpcompile.DPCompileError, match="no graph that clipped this optimizer's parameters"):
        opt.step()


def test_make_private_calibrates_sigma_for_the_randomized_groups(monkeypatch):
    """make_private predicts the randomized groups from the module tree for the sigma search (patched here: a
    search at k = 32 takes about a minute); the optimizer compares the prediction with the compiled graphs before
    its first step, and searches again if they differ."""
    import warnings

    import dpcompile
    from dpcompile.privacy import accounting, engine

    calls = []

    def fake_sigma(*args, **kwargs):
        calls.append(kwargs)
        return 1.25 + len(calls)

    monkeypatch.setattr(engine, "get_noise_multiplier", fake_sigma)
    monkeypatch.setattr(accounting, "get_noise_multiplier", fake_sigma)

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

        def forward(self, x, y):
            return (self.net(x) - y).pow(2).sum() / x.shape[0]

    data = torch.utils.data.TensorDataset(torch.randn(64, 5, 3), torch.randn(64, 5, 2))
    model = Seq()
    torch._dynamo.reset()
    dp_model, opt, loader = dpcompile.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), torch.utils.data.DataLoader(data, batch_size=8),
        target_epsilon=8.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0, clipping="per_layer",
        strategy={"net.2.*": "randomized"}, backend="flashdp_eager")
    assert calls[0]["probes"] == 32 and calls[0]["group_weights"] == pytest.approx([0.5])
    assert opt.noise_multiplier == 2.25
    x, y = data[:4]
    dp_model(x, y).backward()
    assert opt.randomized_norms["group_weights"] == pytest.approx([0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # the prediction was right: no second search
    (entry,) = opt.accountant.history
    assert len(calls) == 1 and entry[3].probes == 32 and entry[3].group_weights == pytest.approx((0.5,))
    # a wrong prediction is replaced before the first step
    opt.steps_taken = 0
    opt._calibration["spec"] = {"probes": 32, "variant": "hutchinson", "group_weights": None}
    dp_model(x, y).backward()
    with pytest.warns(UserWarning, match="recalibrated"):
        opt.step()
    assert len(calls) == 2 and calls[1]["group_weights"] == pytest.approx([0.5]) and opt.noise_multiplier == 3.25
    with pytest.raises(dpcompile.DPCompileError, match="pld"):
        dpcompile.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.utils.data.DataLoader(data, batch_size=8), noise_multiplier=1.0,
                               target_delta=1e-5, epochs=1, max_grad_norm=1.0, accountant="rdp",
                               strategy="randomized", backend="flashdp_eager")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", K.VARIANTS)
def test_gpu_bf16_and_default_blocks(variant):
    g = torch.Generator().manual_seed(20)
    for B, T, M, N in ((3, 300, 256, 96), (2, 1, 33, 65), (4, 129, 70, 200)):
        a = torch.randn(B, T, M, generator=g).cuda().bfloat16()
        b = torch.randn(B, T, N, generator=g).cuda().bfloat16()
        got = K.randomized_sq_norms(a, b, 24, variant, SEED, 1).cpu().double()
        want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 24, variant, SEED, 1, dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    a, b = _low_rank(2, 64, 128, 96, 3, g, torch.bfloat16)
    torch.testing.assert_close(K.randomized_sq_norms(a, b, 12, "hutchpp", SEED, 0).cpu().double(),
                               _exact(a.cpu(), b.cpu()), rtol=2e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_tensor_core_products_match_ieee_fp32(dtype):
    """tf32x3 (the default) against IEEE fp32 FMAs with the same probes, at a long T where the row slices split:
    the two differ by fp32-sized rounding only, far inside the estimator's own spread."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(2, 4096, 768, generator=g).cuda().to(dtype)
    b = torch.randn(2, 4096, 96, generator=g).cuda().to(dtype)
    assert K._splits(2, 4096, 6, 64, None) > 1  # b^T z over the 768 columns, in 6 tiles
    fast = K.randomized_sq_norms(a, b, 32, "hutchinson", SEED, 4)
    ieee = K.randomized_sq_norms(a, b, 32, "hutchinson", SEED, 4, precision="ieee", splits=1)
    torch.testing.assert_close(fast, ieee, rtol=2e-5, atol=0)
    want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 32, "hutchinson", SEED, 4, dtype=torch.float64)
    torch.testing.assert_close(fast.cpu().double(), want, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_probes_and_inductor():
    torch.testing.assert_close(K.dump_probes(SEED, 3, 4, 300, 0, 40, "cuda").cpu(),
                               K.gaussian_probes_reference(SEED, 3, 4, 300, range(40)), rtol=0, atol=1e-5)
    a = torch.randn(3, 77, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3, 77, 48, device="cuda", dtype=torch.bfloat16)

    def f(a, b):
        seed = torch.ops.dpcompile.probe_seed(a, 16, "hutchinson")
        return torch.ops.dpcompile.linear_norm_randomized(a, b, 16, "hutchinson", seed, 0), seed

    got, seed = torch.compile(f, backend="inductor")(a, b)
    want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 16, "hutchinson", seed.cpu(), 0, dtype=torch.float64)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_probe_seed_does_not_synchronize():
    """The per-step seed reaches the GPU by a copy queued on the stream: a pageable copy would wait for the whole
    stream in mid-step (run 19's profile: 3 ms of idle GPU a step)."""
    x = torch.empty(1, device="cuda")
    torch.ops.dpcompile.probe_seed(x, 8, "hutchinson")  # the pinned-memory pool's first block
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seeds = [torch.ops.dpcompile.probe_seed(x, 8, "hutchinson") for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len({int(s.item()) for s in seeds}) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", K.VARIANTS)
def test_gpu_products_estimate_with_the_sites_probes(variant):
    """randomized_stored's estimate on the GPU (bf16 products, tensor cores, eager and through Inductor) against the
    fp64 reference with the same probes, and against the rows' estimate of the same site."""
    g = torch.Generator().manual_seed(22)
    a = torch.randn(2, 300, 64, generator=g).cuda().bfloat16()
    b = torch.randn(2, 300, 96, generator=g).cuda().bfloat16()
    s = torch.bmm(a.transpose(1, 2), b)  # (2, 64, 96) bf16, as the vendor GEMM stores them
    want = K.randomized_sq_norms_of_products_reference(s.cpu().double(), 24, variant, SEED, 1, dtype=torch.float64)
    torch.testing.assert_close(K.randomized_sq_norms_of_products(s, 24, variant, SEED, 1).cpu().double(), want,
                               rtol=1e-4, atol=0)
    op = torch.compile(lambda s, seed: torch.ops.dpcompile.persample_norm_randomized(s, 24, variant, seed, 1),
                       backend="inductor")
    torch.testing.assert_close(op(s, torch.tensor([SEED], device="cuda")).cpu().double(), want, rtol=1e-4, atol=0)
    rows = K.randomized_sq_norms(a, b, 24, variant, SEED, 1).cpu().double()
    torch.testing.assert_close(rows, want, rtol=2e-2, atol=0)  # the products' bf16 rounding apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_step_from_products_or_rows_alike():
    """The same seed gives the same clipped gradient through Inductor whether the site is probed on its stored
    products (default budget) or on its rows (a budget nothing fits)."""
    import dpcompile

    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(4, 64, 6, generator=g).cuda(), torch.randn(4, 64, 4, generator=g).cuda()
    grads = []
    for budget in ({}, {"single_pass_budget_mb": 1e-4}):
        model = _Bilinear().cuda()
        torch.manual_seed(0)
        torch.nn.init.normal_(model.lin.weight)
        torch._dynamo.reset()
        compiled = dpcompile.compile(model, backend="flashdp", loss_reduction="sum", clipping="flat",
                                     max_grad_norm=0.3, strategy="randomized", probes=8, **budget)
        RO.manual_probe_seed(5)
        compiled(x, w).backward()
        grads.append(model.lin.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
