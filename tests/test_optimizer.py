"""DPOptimizer: calibrated noise once per logical step, expected-batch scaling, accumulation, empty batches,
checkpoints, secure mode; and make_private end to end."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dpcompile
from dpcompile import DPOptimizer


def _zero_clipped_sums(model, max_grad_norm=1.0):
    """Run an empty batch through the compiled model: the clipped sums are exactly zero, and the parameters are
    marked as privatized, so whatever the optimizer applies afterwards is its noise alone. max_grad_norm: the
    optimizer's (a dict of per-group thresholds names groups group0 = weight, group1 = bias)."""
    torch._dynamo.reset()
    clipping = [["weight"], ["bias"]] if isinstance(max_grad_norm, dict) else "per_layer"
    compiled = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", max_grad_norm=max_grad_norm,
                                 clipping=clipping)
    compiled(torch.zeros(0, model.in_features)).sum().backward()
    return compiled


def _applied_update(model, opt_kwargs, micro_batches=1, **dp_kwargs):
    before = [p.detach().clone() for p in model.parameters()]
    compiled = _zero_clipped_sums(model, dp_kwargs["max_grad_norm"])
    for _ in range(micro_batches - 1):
        compiled(torch.zeros(0, model.in_features)).sum().backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), **dp_kwargs)
    opt.step()
    return torch.cat([(b - p.detach()).float().flatten() for b, p in zip(before, model.parameters())]), opt


@pytest.mark.parametrize("reduction,C,EB", [("mean", 1.5, 32.0), ("sum", 0.5, 8.0)])
def test_noise_std_is_sigma_C_over_expected_batch(reduction, C, EB):
    torch.manual_seed(0)
    update, _ = _applied_update(nn.Linear(96, 96), {}, noise_multiplier=0.8, max_grad_norm=C,
                                expected_batch_size=EB, loss_reduction=reduction)
    want = 0.8 * C / (EB if reduction == "mean" else 1.0)
    assert abs(update.std().item() / want - 1) < 0.03
    assert abs(update.mean().item()) < 4 * want / math.sqrt(update.numel())


def test_noise_once_per_logical_step_under_accumulation():
    torch.manual_seed(1)
    update, _ = _applied_update(nn.Linear(96, 96), {}, micro_batches=4, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=1.0, loss_reduction="sum")
    assert abs(update.std().item() - 1.0) < 0.03  # not 2.0 (= sqrt(4) micro-batches of noise)


def test_empty_logical_batch_still_gets_noise():
    """No backward at all (grads None): the step still adds noise."""
    model = nn.Linear(96, 96)
    _zero_clipped_sums(model)
    for p in model.parameters():
        p.grad = None
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=1.0,
                      expected_batch_size=4.0, generator=torch.Generator().manual_seed(3))
    opt.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert abs(update.std().item() / 0.5 - 1) < 0.03


def test_fresh_noise_every_step_and_grads_consumed():
    model = nn.Linear(64, 64)
    compiled = _zero_clipped_sums(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=1.0, loss_reduction="sum", generator=torch.Generator().manual_seed(0))
    updates = []
    for _ in range(2):
        before = model.weight.detach().clone()
        compiled(torch.zeros(0, 64)).sum().backward()
        opt.step()
        assert model.weight.grad is None  # the noisy gradient does not leak into the next step
        updates.append((before - model.weight.detach()).flatten())
    corr = torch.corrcoef(torch.stack(updates))[0, 1].item()
    assert abs(corr) < 0.05


def test_noisy_sums_are_the_clipped_sums_plus_the_generators_draw():
    """(g + sigma C z) / expected_batch_size, z the generator's standard normals in parameter order: the draw is
    scaled as it is made (normal_), and the clipped sums are added once."""
    model = nn.Linear(5, 3)
    _zero_clipped_sums(model, max_grad_norm=0.4)
    sums = [torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) for k, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), sums):
        p.grad.copy_(g)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.5, max_grad_norm=0.4,
                      expected_batch_size=4.0, generator=torch.Generator().manual_seed(7))
    opt.add_noise()
    z = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(7))
    want = (torch.cat([g.flatten() for g in sums]) + 1.5 * 0.4 * z) / 4.0
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_noise_is_fp32_for_bf16_parameters():
    model = nn.Linear(128, 128).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum")
    compiled(torch.zeros(0, 128, dtype=torch.bfloat16)).sum().backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1e-3, max_grad_norm=1.0,
                      expected_batch_size=1.0, generator=torch.Generator().manual_seed(0))
    opt.add_noise()
    g = model.weight.grad
    assert g.dtype == torch.bfloat16 and abs(g.float().std().item() / 1e-3 - 1) < 0.03


def test_per_group_thresholds_use_the_total_norm():
    torch.manual_seed(2)
    thresholds = {"group0": 0.6, "group1": 0.8}
    update, opt = _applied_update(nn.Linear(96, 96), {}, noise_multiplier=1.0, max_grad_norm=thresholds,
                                  expected_batch_size=1.0, loss_reduction="sum")
    assert opt.max_grad_norm_total == pytest.approx(1.0)
    assert abs(update.std().item() - 1.0) < 0.03


def test_same_generator_seed_same_noise_and_secure_mode_differs():
    runs = []
    for mode in ("seeded", "seeded", "secure", "secure"):
        torch.manual_seed(0)
        kw = dict(secure_mode=True) if mode == "secure" else dict(generator=torch.Generator().manual_seed(7))
        update, _ = _applied_update(nn.Linear(32, 32), {}, noise_multiplier=1.0, max_grad_norm=1.0,
                                    expected_batch_size=1.0, loss_reduction="sum", **kw)
        runs.append(update)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[2], runs[3])
    assert abs(runs[2].std().item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="secure_mode"):
        DPOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), noise_multiplier=1.0,
                    max_grad_norm=1.0, expected_batch_size=1.0, secure_mode=True, generator=torch.Generator())


def test_sensitivity_above_max_grad_norm_is_refused():
    """A model compiled with C = 2 but noised for C = 1 would be under-noised: refused before any noise."""
    model = nn.Linear(4, 4)
    compiled = _zero_clipped_sums(model, max_grad_norm=2.0)
    compiled(torch.randn(3, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    with pytest.raises(dpcompile.DPCompileError, match=r"bound one sample's clipped gradient by 2 .*max_grad_norm=1"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing was touched
    # a larger C in the optimizer only over-noises: allowed; and check_sensitivity=False skips the check
    for kw in (dict(max_grad_norm=3.0), dict(max_grad_norm=1.0, check_sensitivity=False)):
        compiled(torch.randn(3, 4)).sum().backward()
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, expected_batch_size=4.0,
                    **kw).step()
    # per-group thresholds: the root of the sum of their squares counts (0.6, 0.9 -> 1.08 > 0.6, 0.8 -> 1.0)
    model = nn.Linear(4, 4)
    torch._dynamo.reset()
    dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", clipping=[["weight"], ["bias"]],
                      max_grad_norm={"group0": 0.6, "group1": 0.9})(torch.randn(3, 4)).sum().backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                      max_grad_norm={"group0": 0.6, "group1": 0.8}, expected_batch_size=4.0)
    with pytest.raises(dpcompile.DPCompileError, match="1.08167"):
        opt.step()


def test_a_graph_compiled_after_steps_is_counted_in_the_sensitivity():
    """The optimizer keeps the graphs-by-parameter-set answer between steps (coverage.py); a second compile of the
    same model with a larger C adds a graph to the same tensors, and the next step must see it and refuse."""
    model = nn.Linear(4, 4)
    compiled = _zero_clipped_sums(model, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    for _ in range(2):
        compiled(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    torch._dynamo.reset()
    wider = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", max_grad_norm=2.0)
    wider(torch.randn(3, 4)).sum().backward()
    with pytest.raises(dpcompile.DPCompileError, match=r"bound one sample's clipped gradient by 2 .*max_grad_norm=1"):
        opt.step()


def test_gradient_set_by_hand_is_refused_even_after_a_clipping_graph():
    """A parameter a flashdp graph clipped before: a .grad written by hand afterwards is not vouched for."""
    model = nn.Linear(2, 2)
    _zero_clipped_sums(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    with pytest.raises(dpcompile.CoverageError, match="set outside a flashdp graph"):
        opt.step()


def test_unclipped_gradient_is_refused():
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()  # eager: not clipped
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    with pytest.raises(dpcompile.CoverageError, match="no flashdp graph produced it"):
        opt.step()


def test_state_dict_round_trip_with_accountant():
    def build(model):
        return DPOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), noise_multiplier=1.1, max_grad_norm=1.0,
                           expected_batch_size=8.0, accountant=dpcompile.PrivacyAccountant("rdp"),
                           sample_rate=0.01, generator=torch.Generator().manual_seed(5))

    model = nn.Linear(8, 8)
    compiled = _zero_clipped_sums(model)
    opt = build(model)
    for _ in range(3):
        compiled(torch.zeros(0, 8)).sum().backward()
        opt.step()
    state = opt.state_dict()
    restored = build(nn.Linear(8, 8))
    restored.original_optimizer.param_groups[0]["params"] = opt.original_optimizer.param_groups[0]["params"]
    restored.load_state_dict(state)
    assert restored.steps_taken == 3
    assert restored.get_epsilon(1e-5) == pytest.approx(opt.get_epsilon(1e-5))
    assert restored.generator.get_state().equal(opt.generator.get_state())
    assert restored.state_dict()["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])


def test_lr_scheduler_accepts_the_wrapper():
    model = nn.Linear(4, 4)
    _zero_clipped_sums(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_make_private_end_to_end_at_epsilon_8():
    """A tiny classifier trained with make_private at eps = 8: the loss falls and the spent eps stays below 8."""
    g = torch.Generator().manual_seed(0)
    N, d = 1024, 8
    x = torch.randn(N, d, generator=g)
    y = (x @ torch.randn(d, generator=g) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 2))

    class WithLoss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, xb, yb):
            # a mean over samples (F.cross_entropy's own 'mean' divides by a count of non-ignored targets
            # taken over the whole batch, which dpcompile refuses)
            return nn.functional.cross_entropy(self.net(xb), yb, reduction="sum") / xb.shape[0]

    torch._dynamo.reset()
    dp_model, opt, dp_loader = dpcompile.make_private(
        WithLoss(model), torch.optim.SGD(model.parameters(), lr=0.5), loader, target_epsilon=8.0,
        target_delta=1e-5, epochs=3, max_grad_norm=1.0, clipping="flat", max_physical_batch_size=48,
        backend="flashdp_eager", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(3):
        for micro_batches in dp_loader:
            for xb, yb in micro_batches:
                dp_model(xb, yb).backward()
            opt.step()
    with torch.no_grad():
        end = nn.functional.cross_entropy(model(x), y).item()
    eps = opt.get_epsilon(1e-5)
    assert end < 0.8 * start, (start, end)
    assert opt.steps_taken == opt.planned_steps == 3 * len(dp_loader)
    assert 7.0 < eps <= 8.0


def test_refused_graph_does_not_vouch_for_its_parameters():
    """A compile that dpcompile refused must not mark the parameters as clipped: falling back to eager training
    afterwards is caught by the optimizer."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    torch._dynamo.reset()
    with pytest.raises(Exception):
        dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum")(torch.randn(4, 3)).sum().backward()
    model(torch.randn(4, 3)).sum().backward()  # eager: not clipped
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0)
    with pytest.raises(dpcompile.CoverageError):
        opt.step()
