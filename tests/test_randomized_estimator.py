"""Randomized norms, the estimator and its ops: Hutchinson's and Hutch++'s statistics (unbiased, predicted variance,
exact on low rank), dpcompile::probe_seed / linear_norm_randomized and the exact-norms test hook."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dpcompile.codegen import randomized_ops as RO
from dpcompile.codegen.kernels import randomized as K
from dpcompile.codegen.ops import linear_clipped_sum_reference, linear_norm_reference
from dpcompile.privacy import randomized_accounting as RA
from randomized_common import BLOCK, DEVICE, SEED, _exact, _low_rank


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
def test_draw_probe_seed():
    seeds = {RO.draw_probe_seed(DEVICE).item() for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2 ** 63 for s in seeds)
    # the summary the accountant makes of the effective probe counts behind a step's gradients
    assert RA.probes_summary({RA.accounting_probes(8)}) == (8, True) and RA.probes_summary(()) is None
    ran = {RA.accounting_probes(32), RA.accounting_probes(12, "hutchpp")}
    assert RA.probes_summary(ran) == (4, True)  # the smallest effective count: 12 - 2 * 4; 32 = 8 * 4
    assert RA.probes_summary({RA.accounting_probes(32), RA.accounting_probes(15, "hutchpp")}) == (5, False)
    with RO.manual_probe_seed(7):
        first = [RO.draw_probe_seed(DEVICE).item() for _ in range(3)]
    with RO.manual_probe_seed(7):
        assert first == [RO.draw_probe_seed(DEVICE).item() for _ in range(3)]
    # the block restored the seed source: secret seeds again, not the sequence of 7
    assert first[0] not in {RO.draw_probe_seed(DEVICE).item() for _ in range(3)}
    seed = RO.draw_probe_seed(DEVICE)
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device.type == torch.device(DEVICE).type
    a = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError):
        torch.ops.dpcompile.linear_norm_randomized(a, a, 0, "hutchinson", seed, 0)
    with pytest.raises(ValueError):
        torch.ops.dpcompile.linear_norm_randomized(a, a, 8, "rademacher", seed, 0)


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
    """Fake tensors (no data-dependent seed), and a compiled graph estimating with the seed it is given."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 5, 6, generator=g).to(DEVICE), torch.randn(2, 5, 4, generator=g).to(DEVICE)

    def f(a, b, seed):
        return (torch.ops.dpcompile.linear_norm_randomized(a, b, 8, "hutchinson", seed, 0)
                + torch.ops.dpcompile.linear_norm_randomized(a, b, 8, "hutchinson", seed, 1)), seed

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    (x, s1), (y, s2) = cf(a, b, RO.draw_probe_seed(DEVICE)), cf(a, b, RO.draw_probe_seed(DEVICE))
    assert s1.item() != s2.item() and not torch.equal(x, y)
    want = sum(K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 8, "hutchinson", s1.cpu(), site, dtype=torch.float64)
               for site in (0, 1))
    torch.testing.assert_close(x.cpu().double(), want, rtol=1e-4, atol=0)


def test_exact_hook_gives_the_exact_clipped_gradient():
    """Norms from the randomized op under exact_norms() -> clip factors -> clipped sum equal the exact path.
    (The full-model version belongs with the planner's wiring of the strategy.)"""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 6, 8, generator=g).to(DEVICE), torch.randn(4, 6, 5, generator=g).to(DEVICE)
    seed = RO.draw_probe_seed(DEVICE)
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
