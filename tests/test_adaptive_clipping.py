"""Adaptive clipping (issue 23 item 3; dpcompile/privacy/adaptive.py): max_grad_norm="adaptive".

The thresholds are an input of the compiled graph (one graph while they change), the gradients are the float64
oracle's clipped sums at the thresholds of each step, the thresholds track a known quantile of the per-sample
norms, epsilon equals a direct composition of the two Gaussian mechanisms computed with dp-accounting, the noise
is z_D times the thresholds that clipped, checkpoints resume exactly, and misuse is refused."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dpcompile
from dp_check import CountingBackend, LossModule
from dpcompile.errors import DPCompileError, OptionsError
from dpcompile.privacy.accounting import PrivacyAccountant, get_epsilon
from dpcompile.privacy.adaptive import (combined_noise_multiplier, gradient_noise_multiplier,
                                        quantile_noise_multiplier)
from dpcompile.testing import oracle

DELTA = 1e-5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _mse(m, x, y):  # a sum of per-sample losses
    return ((m(x) - y) ** 2).sum()


def _batch(B, g):
    return torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)


def _optimizer(model, sigma=0.3, m=16.0, lr=0.05, **adaptive):
    return dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma,
                                 max_grad_norm="adaptive", expected_batch_size=m, loss_reduction="mean",
                                 generator=torch.Generator().manual_seed(3), adaptive_clipping=adaptive or None)


def _compile(model, backend="flashdp_eager", clipping="per_layer", mean=True):
    torch._dynamo.reset()
    return dpcompile.compile(LossModule(model, _mse, mean), backend=backend, max_grad_norm="adaptive",
                             clipping=clipping, loss_reduction="mean" if mean else "sum")


# ------------------------------------------------------------------------------------ the graph


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_gradients_match_the_oracle_at_each_steps_thresholds_with_one_graph(clipping):
    """Every step's clipped sums are the float64 oracle's at the thresholds the optimizer holds at that step (which
    change every step), batch sizes change too, and the model compiles one graph (B >= 2) for all of it."""
    model = _mlp()
    counter = CountingBackend()
    compiled = _compile(model, backend=counter, clipping=clipping)
    opt = _optimizer(model, initial_max_grad_norm=0.3, target_quantile=0.5)
    g = torch.Generator().manual_seed(1)
    groups = oracle.default_groups(model, clipping)
    seen = []
    for step, B in enumerate([6, 9, 5, 12, 7, 8]):
        x, y = _batch(B, g)
        loss = compiled(x, y)
        thresholds = dict(opt.adaptive.values)  # read by this call (known from the first call on)
        names = ["m.flat"] if clipping == "flat" else ["m." + grp[0].rpartition(".")[0] for grp in groups]
        want = oracle.reference_clipped_grads(model, _mse, (x, y), max_grad_norm=1.0, clipping=clipping,
                                              thresholds=[thresholds["flat" if clipping == "flat" else n]
                                                          for n in names])
        loss.backward()
        for name, p in model.named_parameters():
            err = (p.grad - want[name]).abs().max().item()
            assert err <= 1e-9 + 1e-7 * want[name].abs().max().item(), (step, name, err)
        seen.append(thresholds)
        opt.step()
    assert counter.graphs == 1
    assert all(a != b for a, b in zip(seen, seen[1:]))  # the thresholds changed every step, the graph did not
    assert sorted(seen[0]) == sorted(opt.adaptive.values)


def test_a_flat_group_traced_in_pieces_matches_the_oracle_and_its_whole_trace(monkeypatch, caplog):
    """Repeated layers make the flat group's replacement traced in pieces (passes/driver.py _insert_pieces): the
    run-time threshold and the quantile count come from the factor piece. Over steps whose thresholds change, the
    gradients are the oracle's, and the thresholds (which the quantile counts move) are those of the group traced
    whole, bit for bit."""
    import logging

    import dpcompile.passes.driver as driver

    def run(pieces: bool):
        if not pieces:
            monkeypatch.setattr(driver, "_norm_forms", lambda job, io: None)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dpcompile"):
            compiled = _compile(model, clipping="flat")
            opt = _optimizer(model, initial_max_grad_norm=0.3, target_quantile=0.5)
            g = torch.Generator().manual_seed(1)
            seen = []
            for B in (6, 9, 5):
                x, y = _batch(B, g)
                loss = compiled(x, y)
                seen.append(dict(opt.adaptive.values))
                want = oracle.reference_clipped_grads(model, _mse, (x, y), max_grad_norm=1.0, clipping="flat",
                                                      thresholds=[seen[-1]["flat"]])
                loss.backward()
                for name, p in model.named_parameters():
                    err = (p.grad - want[name]).abs().max().item()
                    assert err <= 1e-9 + 1e-7 * want[name].abs().max().item(), (pieces, B, name, err)
                opt.step()
        reused = [r.getMessage() for r in caplog.records if "clipping traces made" in r.getMessage()]
        return seen, reused

    with_pieces, log_pieces = run(True)
    whole, log_whole = run(False)
    assert log_pieces and "0 reused" not in log_pieces[0]  # the pieces path ran and reused the repeated layers'
    assert log_whole and log_whole[0].startswith("flashdp: 1 clipping traces made")
    assert with_pieces == whole
    assert all(a != b for a, b in zip(with_pieces, with_pieces[1:]))


def test_inductor_backend_reads_the_run_time_thresholds():
    """The product backend (Inductor, on the CPU here): same clipped sums as the oracle while C changes."""
    model = _mlp()
    compiled = _compile(model, backend="flashdp", clipping="per_layer")
    opt = _optimizer(model, initial_max_grad_norm=0.2)
    g = torch.Generator().manual_seed(2)
    for B in (6, 7):
        x, y = _batch(B, g)
        loss = compiled(x, y)
        c = opt.adaptive.values
        want = oracle.reference_clipped_grads(model, _mse, (x, y), max_grad_norm=1.0, clipping="per_layer",
                                              thresholds=[c["m.0"], c["m.2"]])
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-7, atol=1e-9)
        opt.step()


def test_empty_and_one_sample_batches_still_release_a_noisy_count():
    """B = 0 (an empty Poisson batch) and B = 1: the step noises the counts every time (the thresholds move even
    when no sample is there: the count's noise is drawn), and the accountant counts every step."""
    model = _mlp()
    compiled = _compile(model)
    acc = PrivacyAccountant()
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.5,
                                max_grad_norm="adaptive", expected_batch_size=16, accountant=acc, sample_rate=0.1,
                                generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for B in (0, 1, 0):
        x, y = _batch(B, g)
        compiled(x, y).backward()
        before = dict(opt.adaptive.values)
        opt.step()
        assert opt.adaptive.values != before
    assert acc.steps == 3


# ------------------------------------------------------------------------------------ the quantile


class _TwoLinear(nn.Module):
    """Per-sample gradients of a.weight = xa_i and of b.weight = xb_i: their norms are the data's norms."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Linear(d, 1, bias=False)
        self.b = nn.Linear(d, 1, bias=False)


def _linear_loss(m, xa, xb):
    return (m.a(xa) + m.b(xb)).sum()


def _with_norms(radii, d, g):
    u = torch.randn(len(radii), d, generator=g, dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True) * radii.unsqueeze(1)


@pytest.mark.parametrize("clipping,gamma", [("per_layer", 0.5), ("flat", 0.8)])
def test_thresholds_track_the_target_quantile_of_a_known_norm_distribution(clipping, gamma):
    """Norms of group a ~ U(1, 3), of group b ~ U(5, 15): per layer, C_a and C_b settle at their own gamma-quantile
    (2 and 10 for gamma = 0.5); flat, C settles at the gamma-quantile of sqrt(|a|^2 + |b|^2)."""
    d, m, steps = 6, 256, 120
    model = _TwoLinear(d).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, _linear_loss, False), backend="flashdp_eager",
                                 max_grad_norm="adaptive", clipping=clipping, loss_reduction="sum")
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.5,
                                max_grad_norm="adaptive", expected_batch_size=m, loss_reduction="sum",
                                generator=torch.Generator().manual_seed(0),
                                adaptive_clipping={"target_quantile": gamma})
    g = torch.Generator().manual_seed(0)

    def radii(B):
        return 1 + 2 * torch.rand(B, generator=g, dtype=torch.float64), \
            5 + 10 * torch.rand(B, generator=g, dtype=torch.float64)

    trace = []
    for _ in range(steps):
        ra, rb = radii(m)
        compiled(_with_norms(ra, d, g), _with_norms(rb, d, g)).backward()
        opt.step()
        trace.append(dict(opt.adaptive.values))
    late = trace[-40:]
    ra, rb = radii(200_000)
    if clipping == "per_layer":
        for group, r in (("m.a", ra), ("m.b", rb)):
            want = torch.quantile(r[:100_000], gamma).item()
            got = sum(t[group] for t in late) / len(late)
            assert abs(got / want - 1) < 0.08, (group, got, want)
    else:
        want = torch.quantile((ra ** 2 + rb ** 2).sqrt()[:100_000], gamma).item()
        got = sum(t["flat"] for t in late) / len(late)
        assert abs(got / want - 1) < 0.08, (got, want)


# ------------------------------------------------------------------------------------ the accounting


@pytest.mark.parametrize("groups", [1, 4])
def test_epsilon_equals_a_direct_composition_with_dp_accounting(groups):
    """The accountant's epsilon for adaptive steps equals dp-accounting's own composition of the two releases:
    the Poisson-sampled composition of the gradient's Gaussian (z_D) and of one Gaussian per group's count
    (sensitivity 1/2, noise sigma_b: multiplier 2 sigma_b), by its RDP accountant; without sampling (q = 1), by its
    PLD accountant. And with the paper's z_D, the pair costs what one plain step at z costs."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    z, sigma_b, q, steps = 0.9, 4.0, 0.02, 300
    z_d = gradient_noise_multiplier(z, sigma_b, groups)
    z_b = quantile_noise_multiplier(sigma_b, groups)
    assert z_b == pytest.approx(2 * sigma_b / math.sqrt(groups))
    assert z_d > z

    def pair():
        return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_d)]
                                             + [dp_accounting.GaussianDpEvent(2 * sigma_b)] * groups)

    rdp = RdpAccountant()
    rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, pair()), steps))
    ours = PrivacyAccountant("rdp")
    for _ in range(steps):
        ours.step(noise_multiplier=z_d, sample_rate=q, quantile_noise_multiplier=z_b)
    assert ours.get_epsilon(DELTA) == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)

    interval = 1e-4
    pld = PLDAccountant(value_discretization_interval=interval)
    pld.compose(dp_accounting.SelfComposedDpEvent(pair(), 20))
    full = PrivacyAccountant("pld", value_discretization_interval=interval)
    full.step(noise_multiplier=z_d, sample_rate=1.0, num_steps=20, quantile_noise_multiplier=z_b)
    assert full.get_epsilon(DELTA) == pytest.approx(pld.get_epsilon(DELTA), rel=2e-3)

    # the paper's choice of z_D: the pair is charged exactly what plain DP-SGD at z is (never less)
    assert combined_noise_multiplier(z_d, z_b) >= z
    assert combined_noise_multiplier(z_d, z_b) == pytest.approx(z, rel=1e-12)
    pld_ours = PrivacyAccountant("pld")
    pld_ours.step(noise_multiplier=z_d, sample_rate=q, num_steps=steps, quantile_noise_multiplier=z_b)
    assert pld_ours.get_epsilon(DELTA) == pytest.approx(get_epsilon(z, q, steps, DELTA), rel=1e-3)


def test_the_optimizer_charges_the_composition_and_noises_with_z_d_times_the_clipping_thresholds():
    """End to end: each step is recorded as the composition of its two releases (epsilon = dp-accounting's direct
    composition), and the gradient noise has std z_D * sqrt(sum_g C_g^2) of the thresholds that clipped that step
    (measured on 40k parameters whose clipped sum is known: zero inputs give zero gradients)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    d = 20_000
    model = _TwoLinear(d).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, _linear_loss, False), backend="flashdp_eager",
                                 max_grad_norm="adaptive", clipping="per_layer", loss_reduction="sum")
    sigma, m, q = 0.7, 64.0, 0.05
    acc = PrivacyAccountant("rdp")
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                                max_grad_norm="adaptive", expected_batch_size=m, loss_reduction="sum",
                                accountant=acc, sample_rate=q, generator=torch.Generator().manual_seed(0),
                                adaptive_clipping={"initial_max_grad_norm": 3.0})
    for step in range(4):
        x = torch.zeros(8, d, dtype=torch.float64)  # zero per-sample gradients: the update is the noise alone
        compiled(x, x).backward()
        c_total = math.sqrt(sum(c * c for c in opt.adaptive.values.values()))
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        z_d = gradient_noise_multiplier(sigma, opt.adaptive.quantile_noise_std, 2)
        assert noise.std().item() == pytest.approx(z_d * c_total, rel=0.02), step
    z_b = quantile_noise_multiplier(m / 20, 2)
    direct = RdpAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_d), dp_accounting.GaussianDpEvent(2 * m / 20),
         dp_accounting.GaussianDpEvent(2 * m / 20)])), 4))
    assert opt.get_epsilon(DELTA) == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)
    assert opt.accountant.history[0][0] == pytest.approx(sigma, rel=1e-12) and z_b > sigma


# ------------------------------------------------------------------------------------ front doors


def _dataset(n=96, g=None):
    g = g or torch.Generator().manual_seed(0)
    x, y = _batch(n, g)
    return torch.utils.data.TensorDataset(x, y)


def test_make_private_and_privacy_engine_take_adaptive():
    model = _mlp()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=32)
    dp_model, opt, dp_loader = dpcompile.make_private(
        LossModule(model, _mse, True), torch.optim.SGD(model.parameters(), lr=0.05), loader, noise_multiplier=0.6,
        max_grad_norm="adaptive", target_quantile=0.7, clip_learning_rate=0.3, clipping="flat",
        backend="flashdp_eager", generator=torch.Generator().manual_seed(0), target_delta=DELTA)
    assert opt.adaptive.target_quantile == 0.7 and opt.adaptive.learning_rate == 0.3
    for _, micro_batches in zip(range(3), dp_loader):
        for x, y in micro_batches:
            dp_model(x, y).backward()
        opt.step()
    assert opt.adaptive.version == 3 and len(opt.adaptive.history) == 3
    assert opt.get_epsilon(DELTA) == pytest.approx(get_epsilon(0.6, dp_loader.sample_rate, 3, DELTA), rel=2e-3)
    with pytest.raises(ValueError, match="adaptive"):
        dpcompile.make_private(LossModule(_mlp(), _mse, True), torch.optim.SGD(model.parameters(), lr=0.1), loader,
                               noise_multiplier=0.6, max_grad_norm=1.0, target_quantile=0.7,
                               backend="flashdp_eager")

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 3)).double()
    engine = dpcompile.PrivacyEngine()
    net, opt, loader2 = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                            data_loader=torch.utils.data.DataLoader(_dataset(), batch_size=32),
                                            noise_multiplier=0.8, max_grad_norm="adaptive", target_quantile=0.6,
                                            backend="flashdp_eager")
    assert opt.adaptive is not None and opt.adaptive.target_quantile == 0.6
    for x, y in loader2:
        ((net(x) - y) ** 2).sum(1).mean().backward()
        opt.step()
        break
    assert opt.adaptive.version == 1 and engine.get_epsilon(DELTA) > 0


def test_checkpoint_resumes_the_adaptive_thresholds_exactly(tmp_path):
    from dpcompile.privacy.checkpoint import load_checkpoint, save_checkpoint

    def setup():
        model = _mlp()
        return model, _compile(model), _optimizer(model, initial_max_grad_norm=0.5)

    batches = [_batch(B, torch.Generator().manual_seed(B)) for B in (6, 8, 7, 9, 5)]
    model, compiled, opt = setup()
    for k, (x, y) in enumerate(batches):
        compiled(x, y).backward()
        opt.step()
        if k == 2:
            save_checkpoint(tmp_path / "ck.pt", module=model, optimizer=opt)
    want_c, want_w = dict(opt.adaptive.values), [p.detach().clone() for p in model.parameters()]

    model2, compiled2, opt2 = setup()
    load_checkpoint(tmp_path / "ck.pt", module=model2, optimizer=opt2)
    assert opt2.adaptive.version == 3
    for x, y in batches[3:]:
        compiled2(x, y).backward()
        opt2.step()
    assert opt2.adaptive.values == want_c
    for a, b in zip(model2.parameters(), want_w):
        assert torch.equal(a.detach(), b)


def test_cli_options():
    from dpcompile.cli import UsageError, build_parser
    from dpcompile.train_run import _adaptive_run_options

    args = build_parser().parse_args(["train", "--max-grad-norm", "adaptive", "--target-quantile", "0.7"])
    assert args.max_grad_norm == "adaptive"
    assert _adaptive_run_options(args) == {"target_quantile": 0.7}
    args = build_parser().parse_args(["train", "--max-grad-norm", "2", "--clip-learning-rate", "0.1"])
    with pytest.raises(UsageError, match="--max-grad-norm adaptive"):
        _adaptive_run_options(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--max-grad-norm", "adaptiv"])


def test_cli_trains_with_adaptive_clipping(tmp_path, capsys):
    """`dpcompile train --max-grad-norm adaptive` on the tiny configuration: the report holds the thresholds it
    ended with and the epsilon of --sigma; a sigma the quantile release leaves no room for exits with status 2."""
    import json
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("transformers")
    from dpcompile import cli

    tiny = ["--model", "tiny-llama", "--data", "zen", "--seq-len", "16", "--max-windows", "6", "--batch-size", "6",
            "--micro-batch-size", "3", "--eval-windows", "2", "--lr", "1e-2", "--no-progress", "--delta", "1e-3"]
    out = tmp_path / "run"
    rc = cli.main(["train", *tiny, "--steps", "2", "--sigma", "0.6", "--max-grad-norm", "adaptive",
                   "--clipping", "flat", "--quantile-noise-std", "1.0", "--target-quantile", "0.7", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "dp_report.json").read_text())
    assert report["max_grad_norm"] == "adaptive" and set(report["adaptive_thresholds"]) == {"flat"}
    assert report["adaptive_thresholds"]["flat"] != 1.0
    assert report["epsilon"] == pytest.approx(get_epsilon(0.6, 1.0, 2, 1e-3), rel=2e-3)
    rc = cli.main(["train", *tiny, "--steps", "2", "--sigma", "5", "--max-grad-norm", "adaptive",
                   "--out", str(tmp_path / "run2")])
    assert rc != 0 and "quantile_noise_std" in capsys.readouterr().err
    torch._dynamo.reset()


def test_dp_trainer_trains_with_adaptive_clipping(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dpcompile.hf import DPTrainer
    from models import hf_llama

    torch.manual_seed(0)
    case = hf_llama(T=8, layers=1)
    data = [torch.randint(1, 64, (int(n),)).tolist() for n in torch.randint(3, 9, (16,))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = DPTrainer(model=case.model, args=args, train_dataset=data, noise_multiplier=0.5, target_delta=1e-3,
                        max_grad_norm="adaptive", clipping="flat", expected_batch_size=16,
                        adaptive_clipping={"target_quantile": 0.6, "quantile_noise_std": 2.0})
    trainer.train()
    opt = trainer._dp_optimizer()
    assert opt.adaptive.version == 2 and opt.adaptive.target_quantile == 0.6
    assert any("max_grad_norm" in log for log in trainer.state.log_history)
    assert trainer.get_epsilon() == pytest.approx(get_epsilon(0.5, 1.0, 2, 1e-3), rel=2e-3)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ misuse


def test_misuse_is_refused_clearly():
    # options the quantile cannot work with
    for bad in ({"clip_fn": "automatic"}, {"strategy": "single_pass"}, {"strategy": {"*": "randomized"}}):
        with pytest.raises(OptionsError, match="adaptive"):
            dpcompile.DPOptions.parse({"max_grad_norm": "adaptive", **bad})
    with pytest.raises(OptionsError, match="adaptive"):
        dpcompile.DPOptions.parse({"max_grad_norm": "adapt"})
    model = _mlp()
    with pytest.raises(ValueError, match="max_grad_norm='adaptive'"):
        dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=8, adaptive_clipping={"target_quantile": 0.5})
    with pytest.raises(ValueError, match="target_quantile"):
        _optimizer(model, target_quantile=1.5)

    # an adaptive graph with no adaptive optimizer to choose its thresholds
    compiled = _compile(model)
    x, y = _batch(4, torch.Generator().manual_seed(0))
    with pytest.raises(DPCompileError, match="managed by no DPOptimizer"):
        compiled(x, y)
    with torch.no_grad():
        compiled(x, y)  # evaluation needs no thresholds

    # step before the model ran: the quantile release's groups are unknown
    opt = _optimizer(model)
    with pytest.raises(DPCompileError, match="before any call"):
        opt.step()

    # a forward before a step backpropagated after it: clipped to the old thresholds, refused (one linear layer:
    # its backward does not read the weight the step changed in place)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    compiled = _compile(model)
    opt = _optimizer(model)
    compiled(x, y).backward()
    opt.step()
    stale = compiled(x, y)
    compiled(x, y).backward()
    opt.step()
    stale.backward()
    with pytest.raises(DPCompileError, match="previous thresholds"):
        opt.step()
    opt.zero_grad()

    # a graph with fixed thresholds under an adaptive optimizer
    fixed_model = _mlp()
    torch._dynamo.reset()
    fixed = dpcompile.compile(LossModule(fixed_model, _mse, True), backend="flashdp_eager", max_grad_norm=1.0)
    fixed_opt = _optimizer(fixed_model)
    fixed(x, y).backward()
    with pytest.raises(DPCompileError, match="fixed thresholds"):
        fixed_opt.step()

    # a noise multiplier the quantile release leaves no room for
    with pytest.raises(DPCompileError, match="quantile_noise_std"):
        dpcompile.make_private(LossModule(_mlp(), _mse, True), torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.utils.data.DataLoader(_dataset(), batch_size=8), noise_multiplier=2.0,
                               max_grad_norm="adaptive", backend="flashdp_eager")
    with pytest.raises(DPCompileError, match="not below"):
        gradient_noise_multiplier(1.0, 0.5, 1)


def test_explain_shows_run_time_thresholds_and_no_strategy_that_needs_a_number():
    model = _mlp()
    torch._dynamo.reset()
    plan = dpcompile.explain(LossModule(model, _mse, True), _batch(4, torch.Generator().manual_seed(0)),
                             max_grad_norm="adaptive")
    text = str(plan)
    assert "adaptive" in text and "single_pass" not in text


def test_batch_memory_manager_and_secure_mode_step_once_per_logical_batch():
    """Physical batches of one logical batch add their counts; the thresholds move once per logical batch; secure
    mode draws the counts' noise from its OS-seeded generators too."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 3)).double()
    engine = dpcompile.PrivacyEngine(secure_mode=True)
    net, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                           data_loader=torch.utils.data.DataLoader(_dataset(), batch_size=24),
                                           noise_multiplier=0.8, max_grad_norm="adaptive", backend="flashdp_eager")
    delivered = []
    deliver = opt.adaptive.deliver
    opt.adaptive.deliver = lambda groups, counts, epoch: (delivered.append(float(counts.sum())),
                                                          deliver(groups, counts, epoch))
    with dpcompile.BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as batches:
        for x, y in batches:
            ((net(x) - y) ** 2).sum(1).mean().backward()
            opt.step()
            if opt.steps_taken == 2:
                break
    assert opt.adaptive.version == opt.steps_taken == 2
    assert len(delivered) > 2  # several physical batches per logical one
