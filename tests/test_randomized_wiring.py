"""Randomized norms in compiled graphs and the optimizer: the strategy against the oracle with exact norms, clip
factors from fresh estimates, batch-of-one graphs, the optimizer's and make_private's accounting."""
from __future__ import annotations

import pytest
import torch

from dpcompile.codegen import randomized_ops as RO
from dpcompile.codegen.kernels import randomized as K
from dpcompile.privacy import randomized_accounting as RA
from dpcompile.privacy.accounting import PrivacyAccountant, RandomizedAccountingError, get_epsilon, get_noise_multiplier
from randomized_common import SEED, _exact, Q, DELTA, VDI, _Bilinear


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

    from dpcompile.clip_provenance import randomized_runs

    case = _family(family)
    budget = {} if budget_mb is None else {"single_pass_budget_mb": budget_mb}
    with RO.exact_norms():
        model = assert_matches(case, case.batch(3, seed=1), max_grad_norm=0.05, clipping=clipping,
                               strategy="randomized", loss_reduction="mean", **budget)
        assert randomized_runs(model.parameters()) == {32}  # the gradients say randomized norms made them
        if family == "gpt" and clipping == "per_layer":  # a batch of one: its own graph, estimating too
            model = assert_matches(case, case.batch(1, seed=2), max_grad_norm=0.05, clipping=clipping,
                                   strategy="randomized", probes=12, probe_variant="hutchpp", loss_reduction="mean")
            assert randomized_runs(model.parameters()) == {4}  # 12 - 2 * 4 effective probes


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
        model.lin.weight.grad = None
        with RO.manual_probe_seed(seed):
            compiled(xb, wb).backward()
        return model.lin.weight.grad.clone()

    def expected(est, xb, wb):
        coef = (C / (est.sqrt() + 1e-6)).clamp(max=1.0)
        return torch.einsum("i,itn,itm->nm", coef, wb, xb)

    with RO.manual_probe_seed(5):
        seed = RO.next_probe_seed()  # the seed the graph's first call draws under manual_probe_seed(5)
    got = grad(x, w, 5)
    # the site's operands as the weight-gradient mm has them: dY^T X, so a = w (probes over the outputs), b = x
    est = K.randomized_sq_norms_reference(w, x, k, "hutchinson", seed, 0)
    assert not torch.allclose(est, _exact(x, w), rtol=1e-2)  # really an estimate
    torch.testing.assert_close(got, expected(est, x, w), rtol=1e-10, atol=1e-12)
    assert torch.equal(grad(x, w, 5), got)                      # a fixed seed: the same gradient
    fresh = [grad(x, w, None), grad(x, w, None)]                # OS-entropy seeds: fresh probes every call
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], got)
    # a batch of one: the sample's product s_0 (the weight gradient's mm, (out, in)) gets the same estimator
    with RO.manual_probe_seed(6):
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
        with RO.manual_probe_seed(9):
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


def test_probe_counts_are_bound_to_the_gradient_they_made():
    """The counts accumulate with the gradient over micro-batches and start afresh with a new .grad: a consumed
    gradient's randomized norms are not charged to the next one."""
    import dpcompile
    from dpcompile.clip_provenance import randomized_runs

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    torch._dynamo.reset()
    c8, c16 = (dpcompile.compile(model, backend="flashdp_eager", strategy="randomized", probes=k,
                                 loss_reduction="sum") for k in (8, 16))
    x = torch.randn(3, 5, 3)
    c8(x).sum().backward()
    assert randomized_runs(model.parameters()) == {8}
    c16(x).sum().backward()  # a second micro-batch, accumulated into the same .grad
    assert randomized_runs(model.parameters()) == {8, 16}
    model.zero_grad(set_to_none=True)
    assert randomized_runs(model.parameters()) == frozenset()
    c16(x).sum().backward()
    assert randomized_runs(model.parameters()) == {16}


@pytest.mark.parametrize("second,envelope", [(12, "chernoff"), (16, "chi2")])
def test_mixed_probe_counts_reach_the_accountant_with_the_gradients(second, envelope):
    """Two models compiled with 8 and `second` probes, stepped by one optimizer: the gradients carry both counts,
    the accountant takes the smallest, and the Chernoff envelope where the other is not a multiple of it."""
    import math

    import dpcompile
    from dpcompile.clip_provenance import randomized_runs

    models = []
    for k in (8, second):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        torch._dynamo.reset()
        compiled = dpcompile.compile(model, backend="flashdp_eager", strategy="randomized", clipping="flat",
                                     probes=k, loss_reduction="sum")
        compiled(torch.randn(3, 5, 3)).sum().backward()
        assert randomized_runs(model.parameters()) == {k}
        models.append(model)
    params = [p for m in models for p in m.parameters()]
    assert randomized_runs(params) == {8, second}
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    opt = dpcompile.DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=math.sqrt(2),
                                expected_batch_size=3.0, loss_reduction="sum", accountant=acc, sample_rate=Q)
    opt.step()
    (entry,) = acc.history
    assert entry[3].probes == 8 and entry[3].envelope == envelope
    assert entry[3].group_weights == pytest.approx((0.5, 0.5))


def test_randomized_steps_the_optimizer_cannot_account_are_refused(monkeypatch):
    import dpcompile
    from dpcompile.clip_provenance import randomized_runs
    from dpcompile.privacy import optimizer as optimizer_module

    # an accountant stepped by hand, told what the gradients say (randomized norms ran) but not how to account
    # them: epsilon refused
    model, _, _ = _randomized_step("flat", None)
    acc = PrivacyAccountant(value_discretization_interval=VDI)
    acc.step(noise_multiplier=1.0, sample_rate=Q, probes_ran=randomized_runs(model.parameters()))
    with pytest.raises(RandomizedAccountingError):
        acc.get_epsilon(DELTA)
    # the RDP accountant has no bound for them: refused before any noise
    model, _, opt = _randomized_step("flat", PrivacyAccountant("rdp"))
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(dpcompile.DPCompileError, match="PLD"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # randomized norms ran for another model: they travel with that model's gradients, and an optimizer of
    # parameters clipped exactly accounts a plain Gaussian step
    _randomized_step("flat", None)
    other = torch.nn.Linear(3, 2)
    torch._dynamo.reset()
    dpcompile.compile(other, backend="flashdp_eager", loss_reduction="sum")(torch.randn(2, 3)).sum().backward()
    assert randomized_runs(other.parameters()) == frozenset()
    acc = PrivacyAccountant()
    opt = dpcompile.DPOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=2.0, accountant=acc, sample_rate=Q)
    opt.step()
    assert acc.history == [(1.0, Q, 1)]
    # gradients that say randomized norms made them, but no graph of the optimizer's parameters describes them:
    # refused before any noise
    model, _, opt = _randomized_step("flat", PrivacyAccountant())
    monkeypatch.setattr(optimizer_module, "randomized_accounting", lambda *a: None)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(dpcompile.DPCompileError, match="no graph that clipped this optimizer's parameters"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


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
