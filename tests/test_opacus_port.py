"""Issue 22: an Opacus script and its dpcompile port (docs/porting-from-opacus.md: the imports change, nothing
else), run side by side with Opacus itself. The same sigma for the same target, the same epsilon after the same
steps, and, on one seed with noise_multiplier=0 and the same Poisson batches, the same clipped sums and parameters.

Opacus clips flat (the default on both sides) and, for loss_reduction="mean", undoes the mean in its grad-sample
hooks (x batch size) and divides the clipped sum by expected_batch_size = int(N * q); dpcompile's DPOptimizer
divides its clipped sum by q * N. With N = 64 and batches of 16 both are 16. The dpcompile side runs with the
default backend ("auto": flashdp_eager on a CPU), as the port does."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

opacus = pytest.importorskip("opacus")

import dpcompile  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)

N, D, BATCH_SIZE, DELTA = 64, 6, 16, 1e-5


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return x, (x[:, 0] - 0.5 * x[:, 1] > 0).long()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 2))


@pytest.fixture(autouse=True)
def _quiet():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flashdp: .* returns tensors")  # the loss is outside: meant here
        warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        yield


def _script(PrivacyEngine, accountant, epochs=1, lr=0.5, max_grad_norm=1.0, target_epsilon=3.0):
    """A typical Opacus script; called with opacus.PrivacyEngine it is the script, with dpcompile.PrivacyEngine its
    port (only the import differs). Returns (sigma, epsilon after training, steps taken)."""
    images, labels = _data()
    train_loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE,
                              generator=torch.Generator().manual_seed(1))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = PrivacyEngine(accountant=accountant)
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, target_epsilon=target_epsilon,
        target_delta=DELTA, epochs=epochs, max_grad_norm=max_grad_norm)
    steps = 0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
    return optimizer.noise_multiplier, privacy_engine.get_epsilon(DELTA), steps


# (a) sigma for the same target; (b) epsilon after the same steps at the same sigma and q --------------------------
# Opacus "prv" (PRV accountant, Gopi et al.) against dpcompile "pld" (dp_accounting's PLD; dpcompile answers "prv"
# by PLD too), and RDP against RDP.
@pytest.mark.parametrize("accountants", [("prv", "pld"), ("rdp", "rdp")], ids=["prv-vs-pld", "rdp-vs-rdp"])
def test_same_sigma_and_epsilon(accountants):
    ours = {"opacus": opacus.PrivacyEngine, "dpcompile": dpcompile.PrivacyEngine}
    sigma_o, eps_o, steps_o = _script(ours["opacus"], accountants[0])
    sigma_d, eps_d, steps_d = _script(ours["dpcompile"], accountants[1])
    assert steps_o == steps_d == N // BATCH_SIZE  # both Poisson loaders yield len(loader) batches an epoch
    assert sigma_d == pytest.approx(sigma_o, rel=0.01), (accountants, sigma_o, sigma_d)

    # (b) the same history (sigma, q, steps) on both accountants: the epsilon each reports
    q, steps, sigma = BATCH_SIZE / N, 40, 1.1
    acc_o = opacus.PrivacyEngine(accountant=accountants[0]).accountant
    acc_o.history = [(sigma, q, steps)]
    acc_d = dpcompile.PrivacyEngine(accountant=accountants[1]).accountant
    for _ in range(steps):
        acc_d.step(noise_multiplier=sigma, sample_rate=q)
    assert acc_d.get_epsilon(DELTA) == pytest.approx(acc_o.get_epsilon(DELTA), rel=0.01), accountants


def test_epsilon_reported_by_the_scripts():
    """(b) as the scripts report it: make_private with one sigma, the same number of steps, get_epsilon."""
    eps = {}
    for name, (PrivacyEngine, accountant) in {"opacus": (opacus.PrivacyEngine, "prv"),
                                              "dpcompile": (dpcompile.PrivacyEngine, "pld")}.items():
        images, labels = _data()
        loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE,
                            generator=torch.Generator().manual_seed(1))
        model = _model()
        engine = PrivacyEngine(accountant=accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        eps[name] = engine.get_epsilon(DELTA)
    assert eps["dpcompile"] == pytest.approx(eps["opacus"], rel=0.01), eps


# (c) step for step: noise_multiplier=0, the same Poisson index sets fed to both ------------------------------------
def _private(PrivacyEngine, max_grad_norm, **kw):
    images, labels = _data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        loss_reduction="mean", **kw)
    return model, optimizer


def test_step_for_step_same_clipped_sums_and_parameters():
    C, steps, q = 0.05, 4, BATCH_SIZE / N
    images, labels = _data()
    g = torch.Generator().manual_seed(3)
    batches = []
    while len(batches) < steps:  # Poisson index sets at rate q (nonempty: an empty batch is a separate matter)
        idx = (torch.rand(N, generator=g) < q).nonzero().flatten()
        if len(idx) >= 2:
            batches.append(idx)

    m_o, opt_o = _private(opacus.PrivacyEngine, C)
    m_d, opt_d = _private(dpcompile.PrivacyEngine, C, clipping="flat")
    assert opt_o.expected_batch_size == opt_d.expected_batch_size == BATCH_SIZE
    params_o, params_d = list(m_o.parameters()), list(m_d.parameters())
    assert [p.shape for p in params_o] == [p.shape for p in params_d]
    criterion = nn.CrossEntropyLoss()
    for idx in batches:
        x, y = images[idx], labels[idx]
        opt_o.zero_grad()
        criterion(m_o(x), y).backward()
        opt_o.step()
        summed_o = [p.summed_grad.detach().clone() for p in params_o]  # Opacus's clipped sum, before the update

        opt_d.zero_grad()
        criterion(m_d(x), y).backward()
        summed_d = [p.grad.detach().clone() for p in params_d]  # dpcompile's clipped sum, before the step
        opt_d.step()

        # clipping is active: the clipped sum is not the plain summed gradient
        with torch.no_grad():
            norms = torch.stack([torch.cat([p.grad_sample[i].flatten() for p in params_o]).norm()
                                 for i in range(len(idx))])
        assert (norms > C).any() and max(a.abs().max() for a in summed_o) > 1e-3
        for a, b in zip(summed_o, summed_d):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        for a, b in zip(params_o, params_d):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-5)
    assert opt_d.steps_taken == steps
