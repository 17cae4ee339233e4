"""The dpcompile:: custom ops and their *_reference functions against a naive per-sample loop in float64.

Naive: form each sample's gradient s_i explicitly, then ||s_i||_F^2 and sum_i coef_i s_i.
"""
from __future__ import annotations

import pytest
import torch

from hypothesis import given, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import dpcompile  # noqa: F401  (registers the ops)
from dpcompile.codegen import ops
from dpcompile.codegen.ops import linear_direct_norm_reference
from dpcompile.codegen.ops import norm_dtype as ops_norm_dtype

O = torch.ops.dpcompile
B_ = st.integers(0, 4)
W_ = st.integers(1, 5)
SEED = st.integers(0, 2**31 - 1)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def impls(name):
    """The registered op and its plain reference: both must satisfy the contract."""
    return [getattr(O, name), getattr(ops, f"{name}_reference")]


def rnd(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

def naive(samples, coef, shape):
    """samples: list of float64 s_i. Returns (norms (B,), sum_i coef_i s_i)."""
    norms = torch.tensor([float((s * s).sum()) for s in samples], dtype=torch.float64)
    total = torch.zeros(shape, dtype=torch.float64)
    for c, s in zip(coef.double(), samples):
        total += c * s
    return norms, total


def check(name, args, coef_args, exp_norm, exp_sum, in_dtype, out_dtype, B):
    tol = TOL[in_dtype]
    for f in impls(f"{name}_norm"):
        out = f(*args)
        assert out.dtype == torch.float32 and out.shape == (B,), (f, out.dtype, out.shape)
        torch.testing.assert_close(out.double(), exp_norm, **tol)
    for f in impls(f"{name}_clipped_sum"):
        out = f(*coef_args)
        assert out.dtype == out_dtype and out.shape == exp_sum.shape, (f, out.dtype, out.shape)
        torch.testing.assert_close(out.double(), exp_sum, **tol)


# -- linear ---------------------------------------------------------------------------------------------------


def linear_case(a, b, coef, in_dtype=torch.float32, out_dtype=None):
    B, _, M = a.shape
    N = b.shape[-1]
    samples = [a[i].double().t() @ b[i].double() for i in range(B)]
    en, es = naive(samples, coef, (M, N))
    check("linear", (a, b), (a, b, coef), en, es, in_dtype, out_dtype or in_dtype, B)


def _ghost(T, M, N):  # the branch condition of linear_norm_reference
    return T * T * (M + N) < T * M * N


@given(B=B_, T=W_, M=W_, N=W_, seed=SEED)
def test_linear_sweep(B, T, M, N, seed):
    g = torch.Generator().manual_seed(seed)
    linear_case(rnd(g, B, T, M), rnd(g, B, T, N), rnd(g, B))


@pytest.mark.parametrize("ghost", [True, False])
@given(B=B_, small=st.integers(1, 2), big=st.integers(5, 12), seed=SEED)
def test_linear_both_norm_branches(ghost, B, small, big, seed):
    T, M, N = (small, big, big + 1) if ghost else (big, small, small)
    assert _ghost(T, M, N) == ghost  # the shape forces the branch under test
    g = torch.Generator().manual_seed(seed)
    linear_case(rnd(g, B, T, M), rnd(g, B, T, N), rnd(g, B))


@pytest.mark.parametrize("T,M,N", [(2, 6, 6), (2, 9, 7), (6, 2, 2), (9, 2, 3)])  # ghost, ghost, direct, direct
@pytest.mark.parametrize("layout", ["transposed", "strided", "batch_last"])
def test_linear_noncontiguous(T, M, N, layout):
    g = torch.Generator().manual_seed(T * 100 + M * 10 + N)
    B = 3
    if layout == "transposed":
        a, b = rnd(g, B, M, T).transpose(1, 2), rnd(g, B, N, T).transpose(1, 2)
    elif layout == "strided":
        a, b = rnd(g, B, 2 * T, 3 * M)[:, ::2, ::3], rnd(g, B, T, 2 * N)[..., 1::2]
    else:
        a, b = rnd(g, T, B, M).transpose(0, 1), rnd(g, N, B, T).permute(1, 2, 0)
    assert not a.is_contiguous() and not b.is_contiguous()
    linear_case(a, b, rnd(g, 2 * B)[::2])


@pytest.mark.parametrize("T,M,N", [(1, 6, 6), (6, 1, 2), (3, 3, 3)])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_linear_low_precision(T, M, N, dt):
    g = torch.Generator().manual_seed(0)
    linear_case(rnd(g, 4, T, M, dtype=dt), rnd(g, 4, T, N, dtype=dt), rnd(g, 4), in_dtype=dt)


@pytest.mark.parametrize("da,db", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                   (torch.float16, torch.bfloat16)])
def test_linear_mixed_dtypes_promote(da, db):
    g = torch.Generator().manual_seed(1)
    a, b = rnd(g, 3, 2, 4, dtype=da), rnd(g, 3, 2, 5, dtype=db)
    linear_case(a, b, rnd(g, 3), in_dtype=torch.float16, out_dtype=torch.promote_types(da, db))


def test_linear_clipped_sum_fp32_fp64():
    g = torch.Generator().manual_seed(2)
    a, b = rnd(g, 3, 2, 4), rnd(g, 3, 2, 5, dtype=torch.float64)
    for f in impls("linear_clipped_sum"):
        assert f(a, b, torch.ones(3)).dtype == torch.float64


# -- rows -----------------------------------------------------------------------------------------------------


def rows_case(x, coef, dt=torch.float32):
    samples = [x[i].double().sum(0) for i in range(x.shape[0])]
    en, es = naive(samples, coef, (x.shape[-1],))
    check("rows", (x,), (x, coef), en, es, dt, dt, x.shape[0])


@given(B=B_, R=W_, P=W_, seed=SEED, dt=st.sampled_from([torch.float32, torch.float16]))
def test_rows_sweep(B, R, P, seed, dt):
    g = torch.Generator().manual_seed(seed)
    rows_case(rnd(g, B, R, P, dtype=dt), rnd(g, B), dt)


def test_rows_noncontiguous():
    g = torch.Generator().manual_seed(3)
    rows_case(rnd(g, 4, 5, 3).transpose(1, 2), rnd(g, 4))


# -- embedding ------------------------------------------------------------------------------------------------


def embedding_case(idx, g, coef, num_weights, padding_idx, dt=torch.float32):
    B, T = idx.shape
    samples = []
    for i in range(B):
        s = torch.zeros(num_weights, g.shape[-1], dtype=torch.float64)
        for t in range(T):
            if int(idx[i, t]) != padding_idx:
                s[int(idx[i, t])] += g[i, t].double()  # duplicates add before squaring
        samples.append(s)
    en, es = naive(samples, coef, (num_weights, g.shape[-1]))
    check("embedding", (idx, g, padding_idx), (idx, g, coef, num_weights, padding_idx), en, es, dt, dt, B)


@given(B=B_, T=W_, D=W_, V=st.integers(1, 4), extra=st.integers(0, 3), pad=st.sampled_from(["none", "zero", "present"]),
       seed=SEED, dt=st.sampled_from([torch.float32, torch.float16]),
       idt=st.sampled_from([torch.int64, torch.int32]))
def test_embedding_sweep(B, T, D, V, extra, pad, seed, dt, idt):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=gen).to(idt)  # V small: repeated indices within a sample
    num_weights = V + extra  # may exceed max index + 1
    padding_idx = {"none": -1, "zero": 0, "present": int(idx[0, 0]) if B else 0}[pad]
    embedding_case(idx, rnd(gen, B, T, D, dtype=dt), rnd(gen, B), num_weights, padding_idx, dt)


def test_embedding_duplicates_add_before_squaring():
    idx = torch.tensor([[1, 1, 1], [0, 2, 2]])
    g = torch.ones(2, 3, 2)
    for f in impls("embedding_norm"):
        # sample 0: row 1 = (3, 3) -> 18 (not 3 * 2 = 6); sample 1: row 0 = (1,1), row 2 = (2,2) -> 2 + 8
        torch.testing.assert_close(f(idx, g, -1), torch.tensor([18.0, 10.0]))
        torch.testing.assert_close(f(idx, g, 2), torch.tensor([18.0, 2.0]))
        torch.testing.assert_close(f(idx, g, 1), torch.tensor([0.0, 10.0]))
    embedding_case(idx, g, torch.tensor([0.5, -2.0]), 7, 2)


def test_embedding_noncontiguous():
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 3, (4, 5), generator=gen).t()
    g = rnd(gen, 4, 5, 3).transpose(0, 1)
    assert not idx.is_contiguous() and not g.is_contiguous()
    embedding_case(idx, g, rnd(gen, 5), 6, 1)


# -- persample ------------------------------------------------------------------------------------------------


def persample_case(ps, coef, dt=torch.float32):
    samples = [ps[i].double() for i in range(ps.shape[0])]
    en, es = naive(samples, coef, tuple(ps.shape[1:]))
    check("persample", (ps,), (ps, coef), en, es, dt, dt, ps.shape[0])


@given(B=B_, shape=st.lists(W_, min_size=1, max_size=3), seed=SEED,
       dt=st.sampled_from([torch.float32, torch.float16]))
def test_persample_sweep(B, shape, seed, dt):
    g = torch.Generator().manual_seed(seed)
    persample_case(rnd(g, B, *shape, dtype=dt), rnd(g, B), dt)


@pytest.mark.parametrize("shape", [(1,), (5,), (2, 1, 3), (1, 1, 1)])
def test_persample_1d_3d(shape):
    g = torch.Generator().manual_seed(5)
    persample_case(rnd(g, 3, *shape), rnd(g, 3))
    persample_case(rnd(g, *shape, 3).movedim(-1, 0), rnd(g, 3))  # non-contiguous


@pytest.mark.parametrize("shape", [(3,), (2, 1, 3)])
def test_persample_empty_batch(shape):
    persample_case(torch.zeros(0, *shape), torch.zeros(0))


# -- dtype contract and fake implementations ------------------------------------------------------------------


def _calls(dt):
    g = torch.Generator().manual_seed(6)
    idx = torch.tensor([[0, 2, 2], [1, 0, 3]])
    c = torch.ones(2)
    a, b, x, e, p = rnd(g, 2, 3, 4, dtype=dt), rnd(g, 2, 3, 5, dtype=dt), rnd(g, 2, 3, 4, dtype=dt), \
        rnd(g, 2, 3, 6, dtype=dt), rnd(g, 2, 2, 1, 3, dtype=dt)
    t = rnd(g, 2, 4, 5, dtype=dt)
    return [("linear_norm", (a, b)), ("linear_clipped_sum", (a, b, c)), ("linear_tile_norm", (a, b)),
            ("linear_tile_clipped_sum", (a, b, c)), ("linear_tiles", (a, b)), ("linear_products", (a, b)),
            ("tiles_clipped_sum", (t, c)),
            ("rows_norm", (x,)),
            ("rows_clipped_sum", (x, c)), ("embedding_norm", (idx, e, 0)),
            ("embedding_clipped_sum", (idx, e, c, 9, 0)), ("persample_norm", (p,)),
            ("persample_clipped_sum", (p, c))]


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_impls_match_real(dt):
    for name, args in _calls(dt):
        real = getattr(O, name)(*args)
        with FakeTensorMode() as mode:
            fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
            fake = getattr(O, name)(*fargs)
        if name == "linear_tiles":  # (products in the data dtype, the squared norms of their rows)
            (real, real_sq), (fake, fake_sq) = real, fake
            assert (fake_sq.shape, fake_sq.dtype) == (real_sq.shape, real_sq.dtype) == ((2, 4), torch.float32)
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype), name
        if name.endswith("_norm"):
            assert fake.dtype == torch.float32 and fake.shape == (2,), name
        else:
            assert fake.dtype == dt, name


@pytest.mark.parametrize("name", ["linear_norm", "linear_tile_norm", "linear_tile_clipped_sum", "linear_tiles",
                                  "linear_products", "tiles_clipped_sum", "rows_norm", "persample_norm",
                                  "embedding_norm"])
def test_opcheck(name):
    args = dict(_calls(torch.float32))[name]
    torch.library.opcheck(getattr(O, name), args, test_utils=("test_schema", "test_faketensor"))


def test_norms_accumulate_in_fp64_for_fp64_inputs():
    """fp64 data keeps fp64 norms (the contract tests run in fp64); real and fake impls agree."""
    for name, args in _calls(torch.float64):
        if name.endswith("_norm"):
            for f in impls(name):
                assert f(*args).dtype == torch.float64, name


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_single_pass_ops_match_norm_clip_sum(mean, clip_fn):
    """single_pass (whole batch) and single_pass_chunked (one sample per chunk) = the three-step path in float64."""
    from dpcompile.clipping import clip_factors

    g = torch.Generator().manual_seed(3)
    B, T, M, N = 5, 7, 6, 4
    a, b = torch.randn(B, T, M, generator=g, dtype=torch.float64), torch.randn(B, T, N, generator=g, dtype=torch.float64)
    rest = torch.rand(B, generator=g, dtype=torch.float64)
    s = torch.bmm(a.transpose(1, 2), b)
    total = rest + 0.25 * s.pow(2).sum((1, 2))
    total = total * (B * B if mean else 1)
    coef = clip_factors(total, 0.3, clip_fn) * (B if mean else 1)
    want = torch.einsum("s,smn->mn", coef, s)
    for out, c in (torch.ops.dpcompile.linear_single_pass(a, b, rest, 0.25, 0.3, clip_fn, mean),
                   torch.ops.dpcompile.linear_single_pass_chunked(a, b, rest, 0.25, 0.3, clip_fn, mean, 1)):
        torch.testing.assert_close(c, coef)
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_tile_ops_norm_exactly_what_they_sum(dtype):
    """two_pass / single_pass products come from the vendor GEMM in the data dtype: the norm is of those stored
    values (so the clip bound holds for what is summed) and both are close to the float64 products."""
    from dpcompile.codegen.ops import _tiles_and_norms

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 40, 6, generator=g).to(dtype), torch.randn(3, 40, 9, generator=g).to(dtype)
    coef = torch.rand(3, generator=g, dtype=torch.float64).to(ops_norm_dtype(dtype))
    tiles, sq = _tiles_and_norms(a, b)
    assert tiles.dtype == dtype and sq.dtype == ops_norm_dtype(dtype)
    torch.testing.assert_close(sq.double(), tiles.double().pow(2).sum((1, 2)), rtol=1e-6, atol=0)
    exact = torch.bmm(a.double().transpose(1, 2), b.double())
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(torch.ops.dpcompile.linear_tile_norm(a, b).double(), exact.pow(2).sum((1, 2)),
                               rtol=rtol, atol=0)
    want = torch.einsum("s,smn->mn", coef.double(), exact)
    got = torch.ops.dpcompile.linear_tile_clipped_sum(a, b, coef)
    assert got.dtype == dtype and got.shape == (6, 9)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * exact.abs().max().item())
    # stored: the kept products are the ones normed, and the clipped sum is of exactly those
    for f in impls("linear_tiles"):
        kept, kept_sq = f(a, b)  # the squared norms of each sample's rows
        assert kept.dtype == dtype and kept_sq.dtype == ops_norm_dtype(dtype) and kept_sq.shape == (3, 6)
        torch.testing.assert_close(kept_sq.double(), kept.double().pow(2).sum(2), rtol=1e-6, atol=0)
        torch.testing.assert_close(kept.double(), exact, rtol=rtol, atol=rtol * exact.abs().max().item())
        for f_products in impls("linear_products"):  # randomized_stored's products: the same values
            assert torch.equal(f_products(a, b), kept)
        for g_sum in impls("tiles_clipped_sum"):
            total = g_sum(kept, coef)
            assert total.dtype == dtype
            torch.testing.assert_close(total.double(), torch.einsum("s,smn->mn", coef.double(), kept.double()),
                                       rtol=rtol, atol=rtol * exact.abs().max().item())


def test_ghost_norm_op_equals_direct_norm_op():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 9, 5, generator=g, dtype=torch.float64), torch.randn(3, 9, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.dpcompile.linear_ghost_norm(a, b), linear_direct_norm_reference(a, b))


def test_every_summing_op_is_a_clipped_sum_for_the_coverage_check():
    """The coverage check accepts a parameter's gradient only if it comes out of an op registered with the role
    "clipped_sum" (codegen/registry.py): every registered op that returns a clipped sum must have that role, and
    every op Inductor is to inline must be a triton_op defined with dp_op (a new op without its role could not be
    defined at all)."""
    from dpcompile.codegen import randomized_ops  # noqa: F401  (registers the randomized ops too)
    from dpcompile.codegen.registry import inlined_ops
    from dpcompile.passes.verify import clipped_sum_ops

    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dpcompile::")}
    summing = {n for n in names if "clipped_sum" in n or "single_pass" in n}
    assert summing == {op.name().split("::")[1].split(".")[0] for op in clipped_sum_ops()}
    custom = {"linear_single_pass_chunked"}  # custom_ops
    assert names - custom == {op.name().split("::")[1].split(".")[0] for op in inlined_ops()}


def test_an_op_cannot_be_defined_without_its_role():
    from dpcompile.codegen.registry import dp_op

    with pytest.raises(TypeError):
        dp_op()  # role is required
    with pytest.raises(ValueError, match="role"):
        dp_op(role="sum")(lambda x: x)
