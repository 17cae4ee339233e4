"""Randomized norms, the kernels: the probes (Philox, standard normal), the kernels against their PyTorch
reference (interpreter on CPU), and sums of squares that never round down."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpcompile.codegen.kernels import randomized as K
from randomized_common import BLOCK, DEVICE, SEED, _exact


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
