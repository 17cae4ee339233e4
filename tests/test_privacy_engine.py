"""The Opacus-shaped front door (PrivacyEngine, BatchMemoryManager, DPDataLoader), as a user's script runs it:
the same run as dpcompile.make_private's loop, misuse refused, checkpoints that resume exactly, validate / fix.

Every model here is compiled by the eager flashdp backend ("auto" picks it on a CPU)."""
from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile import (BatchMemoryManager, DPDataLoader, LogicalBatchError, PoissonDataLoader, PrivacyBudgetExceeded,
                       PrivacyEngine)
from dpcompile.privacy.engine import resolve_backend
from dpcompile.testing.oracle import reference_clipped_grads

logging.getLogger("absl").setLevel(logging.ERROR)

N, D = 48, 5
DELTA = 1e-3


def _data(n: int = N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.3 * x[:, 1] > 0).long())


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.fixture(autouse=True)
def _quiet():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flashdp: .* returns tensors")  # the loss is outside: meant here
        warnings.filterwarnings("ignore", message="target_delta=")
        yield


# ------------------------------------------------------------------------------- the same run, two APIs
def _opacus_style_run(sigma, steps_per_epoch_log, order, epochs=2):
    """An Opacus script with the imports changed: PrivacyEngine, make_private, BatchMemoryManager, get_epsilon."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_loader = DataLoader(_data(), batch_size=8, generator=torch.Generator().manual_seed(1))
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=sigma, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(7))
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=3,
                                optimizer=optimizer) as memory_safe_data_loader:
            for x, y in memory_safe_data_loader:
                if order == "zero_grad_first":
                    optimizer.zero_grad()
                criterion(model(x), y).backward()
                stepped = optimizer.steps_taken
                optimizer.step()
                if order == "zero_grad_last":
                    optimizer.zero_grad()
                if optimizer.steps_taken > stepped:
                    steps_per_epoch_log.append([p.detach().clone() for p in model.parameters()])
    return model, optimizer, privacy_engine.get_epsilon(DELTA)


def _make_private_run(sigma, log, epochs=2):
    """The same loop against dpcompile.make_private: lists of micro-batches, one step per logical batch."""
    model = _net()
    # PrivacyEngine seeds the sampling generator from the DataLoader's generator (torch.randint(2**62)), so:
    seed = torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(1)).item()
    loader = PoissonDataLoader(_data(), expected_batch_size=8, max_physical_batch_size=3,
                               generator=torch.Generator().manual_seed(seed))
    dp_model, optimizer, loader = dpcompile.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.5), loader, noise_multiplier=sigma, max_grad_norm=1.0,
        clipping="flat", generator=torch.Generator().manual_seed(7), backend="flashdp_eager")
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for micro_batches in loader:
            for x, y in micro_batches:
                criterion(dp_model(x), y).backward()
            optimizer.step()
            log.append([p.detach().clone() for p in model.parameters()])
    return model, optimizer, optimizer.get_epsilon(DELTA)


@pytest.mark.parametrize("order", ["zero_grad_first", "zero_grad_last"])
def test_opacus_style_script_matches_make_private_step_for_step(order):
    assert resolve_backend("auto", _net()) == "flashdp_eager"
    a_log, b_log, c_log = [], [], []
    _, opt_a, eps_a = _opacus_style_run(1.0, a_log, order)
    _, opt_b, eps_b = _opacus_style_run(1.0, b_log, order)  # the same seeds: the same run
    _, opt_c, eps_c = _make_private_run(1.0, c_log)
    assert len(a_log) == len(c_log) == opt_a.steps_taken == 2 * 6  # round(1/q) = 6 logical batches per epoch
    for a, b, c in zip(a_log, b_log, c_log):
        for pa, pb, pc in zip(a, b, c):
            assert torch.equal(pa, pb)
            torch.testing.assert_close(pa, pc, rtol=0, atol=1e-6)
    assert opt_a.noise_multiplier == opt_c.noise_multiplier == 1.0
    assert opt_a.accountant.history == opt_c.accountant.history == [(1.0, 8 / N, 12)]
    assert eps_a == eps_b == pytest.approx(eps_c, rel=1e-12)


def test_make_private_with_epsilon_plans_and_empty_batches_run():
    """q = 2/48: many logical batches are empty; each still steps (noise) and is accounted."""
    model = _net()
    loader = DataLoader(_data(), batch_size=2)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, epochs=1,
        target_epsilon=4.0, target_delta=DELTA, max_grad_norm=1.0)
    assert isinstance(loader, DPDataLoader) and len(loader) == 24
    sizes = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=optimizer) as batches:
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y, reduction="sum").div(max(len(x), 1)).backward()
            optimizer.step()
            sizes.append(len(x))
    assert 0 in sizes and optimizer.steps_taken == optimizer.planned_steps == 24
    assert 3.8 < engine.get_epsilon(DELTA) <= 4.0


# ------------------------------------------------------------------------------------ misuse refused
def _engine_run(**kw):
    model = _net()
    engine = PrivacyEngine()
    loader = DataLoader(_data(), batch_size=kw.pop("batch_size", 8), generator=torch.Generator().manual_seed(3))
    make = engine.make_private_with_epsilon if "target_epsilon" in kw else engine.make_private
    model, optimizer, loader = make(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    data_loader=loader, max_grad_norm=1.0, **kw)
    return model, optimizer, loader, engine


def _backward(model, x, y):
    nn.functional.cross_entropy(model(x), y, reduction="sum").div(8).backward()


def test_two_logical_batches_before_one_step_are_refused():
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0)
    it = iter(loader)
    _backward(model, *next(it))
    _backward(model, *next(it))  # the second logical batch, no step in between
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(LogicalBatchError, match=r"logical batch 0, which was never stepped on, and of logical "
                                                r"batch 1.*zero_grad\(\)"):
        optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing touched
    optimizer.zero_grad()  # discarding them is the way out: the next logical batch steps alone
    _backward(model, *next(it))
    optimizer.step()
    assert optimizer.steps_taken == 1 and optimizer.accountant.steps == 1


def test_a_micro_batch_backpropagated_twice_is_refused():
    """The same physical batch through forward and backward twice: its samples would be clipped and summed twice.
    The optimizer counts the compiled calls' backward passes (recorded at run time) against the batches the loader
    handed out."""
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0, batch_size=12)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=100, optimizer=optimizer) as batches:
        x, y = next(iter(batches))
        _backward(model, x, y)
        _backward(model, x, y)  # counted twice
        with pytest.raises(LogicalBatchError, match="2 backward passes of compiled calls but the loader handed out "
                                                    "1 physical batch of logical batch 0"):
            optimizer.step()


def test_batch_memory_manager_refuses_a_skipped_end_and_a_second_step():
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0, batch_size=12)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as batches:
        for x, y in batches:
            _backward(model, x, y)  # never steps: every logical batch's sums stay in .grad
            if optimizer._batches.open == 1:
                break
    with pytest.raises(LogicalBatchError, match="never stepped on"):
        optimizer.step()
    optimizer.zero_grad()
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0, batch_size=12)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=100, optimizer=optimizer) as batches:
        x, y = next(iter(batches))
        _backward(model, x, y)
        optimizer.step()
        with pytest.raises(LogicalBatchError, match="already called for logical batch 0"):
            optimizer.step()


def test_leaving_the_manager_inside_a_logical_batch_is_refused():
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0, batch_size=24)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as batches:
        for x, y in batches:
            _backward(model, x, y)
            optimizer.step()  # skipped: not the last physical batch of the logical one
            break
    assert optimizer.steps_taken == 0
    with pytest.raises(LogicalBatchError, match="before its last physical batch"):
        optimizer.step()
    optimizer.zero_grad()
    optimizer.step()  # a step with nothing in .grad: noise only, allowed
    assert optimizer.steps_taken == 1


def test_target_epsilon_is_not_overspent_unless_allowed():
    for allow in (False, True):
        model, optimizer, loader, engine = _engine_run(target_epsilon=3.0, target_delta=DELTA, epochs=1,
                                                       allow_overspend=allow)
        planned = optimizer.planned_steps
        for _ in range(2):  # two passes: twice the plan
            for x, y in loader:
                _backward(model, x, y)
                if optimizer.steps_taken < planned:
                    optimizer.step()
                    continue
                if not allow:
                    with pytest.raises(PrivacyBudgetExceeded, match=r"would take epsilon to .* > target_epsilon=3 "
                                                                     r"at delta=0.001.*allow_overspend=True"):
                        optimizer.step()
                    optimizer.zero_grad()
                else:
                    optimizer.step()
        if allow:
            assert optimizer.steps_taken == 2 * planned and engine.get_epsilon(DELTA) > 3.0
        else:
            assert optimizer.steps_taken == planned and engine.get_epsilon(DELTA) <= 3.0


def test_lowering_sigma_mid_run_is_accounted_and_keeps_the_target():
    """sigma lowered after 2 steps: every step is accounted at its own sigma, and the run planned for 3 epochs at
    the calibrated sigma is stopped before its epsilon passes the target."""
    model, optimizer, loader, engine = _engine_run(target_epsilon=3.0, target_delta=DELTA, epochs=3)
    sigma = optimizer.noise_multiplier
    refused = None
    for _ in range(3):
        for x, y in loader:
            _backward(model, x, y)
            try:
                optimizer.step()
            except PrivacyBudgetExceeded as e:
                refused = str(e)
                break
            if optimizer.steps_taken == 2:
                optimizer.noise_multiplier = 0.8 * sigma  # more epsilon per step from now on
        if refused:
            break
    hist = optimizer.accountant.history
    assert refused and "this step has sigma=" in refused
    assert hist[0] == (sigma, 8 / N, 2) and hist[1][:2] == (0.8 * sigma, 8 / N) and len(hist) == 2
    assert 1 <= hist[1][2] and optimizer.steps_taken < 18
    by_hand = dpcompile.PrivacyAccountant()
    by_hand.step(noise_multiplier=sigma, sample_rate=8 / N, num_steps=2)
    by_hand.step(noise_multiplier=0.8 * sigma, sample_rate=8 / N, num_steps=hist[1][2])
    assert engine.get_epsilon(DELTA) == by_hand.get_epsilon(DELTA) <= 3.0
    by_hand.step(noise_multiplier=0.8 * sigma, sample_rate=8 / N)
    assert by_hand.get_epsilon(DELTA) > 3.0  # the refused step would have passed the target


def test_sample_rate_changed_on_one_side_only_is_refused():
    model, optimizer, loader, engine = _engine_run(noise_multiplier=1.0)
    loader.batch_sampler.sample_rate = 0.25  # the loader draws with q = 0.25 from now on; the optimizer says 1/6
    x, y = next(iter(loader))
    _backward(model, x, y)
    with pytest.raises(LogicalBatchError, match=r"drawn with sample_rate=0.25 but the optimizer accounts "
                                                r"sample_rate=0.1666"):
        optimizer.step()
    optimizer.sample_rate, optimizer.expected_batch_size = 0.25, 0.25 * N  # both sides: accounted as it is
    optimizer.step()
    assert optimizer.accountant.history == [(1.0, 0.25, 1)]


def test_max_grad_norm_changes_are_refused_or_warned():
    model, optimizer, loader, _ = _engine_run(noise_multiplier=1.0)
    it = iter(loader)
    optimizer.max_grad_norm = 0.5  # the graphs clip to 1: under-noised
    _backward(model, *next(it))
    with pytest.raises(dpcompile.DPCompileError, match="bound one sample's clipped gradient by 1 .*max_grad_norm=0.5"):
        optimizer.step()
    optimizer.zero_grad()
    optimizer.max_grad_norm = 2.0  # over-noised: privacy holds, and the user is told
    _backward(model, *next(it))
    with pytest.warns(UserWarning, match="max_grad_norm changed to 2, but the compiled graphs clip to 1"):
        optimizer.step()


def test_misconfigured_engine_calls_are_refused():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=8)
    engine = PrivacyEngine()
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                            max_grad_norm=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="one number"):
        engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                            max_grad_norm=[1.0, 1.0])
    with pytest.raises(dpcompile.DPCompileError, match="not parameters of the module"):
        engine.make_private(module=model, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1),
                            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="'pld'"):
        PrivacyEngine(accountant="gdp")
    with pytest.raises(TypeError, match="PoissonDataLoader already yields"):
        BatchMemoryManager(data_loader=PoissonDataLoader(_data(), 0.1), max_physical_batch_size=2, optimizer=opt)


# ---------------------------------------------------------------------------------------- checkpoints
def _train(engine, model, optimizer, loader, steps, stop_at=None, path=None):
    """Steps through BatchMemoryManager passes until `steps` steps; saves a checkpoint after step `stop_at`."""
    while optimizer.steps_taken < steps:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=optimizer) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                _backward(model, x, y)
                optimizer.step()
                if stop_at is not None and optimizer.steps_taken == stop_at:
                    engine.save_checkpoint(path=path, module=model, optimizer=optimizer,
                                           checkpoint_dict={"epoch": 0})
                    stop_at = None
                if optimizer.steps_taken == steps:
                    break


def test_checkpoint_resumes_the_run_exactly(tmp_path):
    path = tmp_path / "ckpt.pt"

    def fresh():
        model = _net()
        engine = PrivacyEngine()
        loader = DataLoader(_data(), batch_size=8, generator=torch.Generator().manual_seed(5))
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01), data_loader=loader, epochs=2,
            target_epsilon=5.0, target_delta=DELTA, max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(11))
        return engine, model, optimizer, loader

    engine, model, optimizer, loader = fresh()
    _train(engine, model, optimizer, loader, 10, stop_at=4, path=path)  # checkpoint inside the first pass (6 steps)
    whole = [p.detach().clone() for p in model.parameters()]
    eps = engine.get_epsilon(DELTA)

    state = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert state["format"] == "dpcompile.checkpoint" and state["extra"] == {"epoch": 0}
    assert state["accountant"]["history"] == [[optimizer.noise_multiplier, 8 / N, 4]]
    assert state["sampler"]["draws"] == 4 and state["optimizer"]["privacy_plan"]["target_epsilon"] == 5.0

    torch._dynamo.reset()
    engine, model, optimizer, loader = fresh()
    extra = engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    assert extra == {"epoch": 0} and optimizer.steps_taken == 4 and optimizer.planned_steps == 12
    _train(engine, model, optimizer, loader, 10)  # the rest of the first pass (2 steps), then 4 of the next
    for p, w in zip(model.parameters(), whole):
        assert torch.equal(p.detach(), w)
    assert engine.get_epsilon(DELTA) == eps


# -------------------------------------------------------------------------------------- validate / fix
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 48)
        self.bn = nn.BatchNorm1d(48)
        self.fc2 = nn.Linear(48, 6)
        self.gn = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 2)
        self.scale = torch.ones(2, requires_grad=True)  # trainable, not a Parameter

    def forward(self, x, y):
        h = self.gn(self.fc2(torch.tanh(self.bn(self.fc1(x)))))
        return nn.functional.cross_entropy(self.head(torch.tanh(h)), y, reduction="sum")


def test_validate_reports_and_fix_repairs_batchnorm():
    model = BNNet()
    problems = dpcompile.validate(model)
    assert [(p.path, p.kind, p.fixable) for p in problems] == [
        ("scale", "not_a_parameter", False), ("bn", "batch_norm", True), ("gn", "group_norm", True)]
    assert "dpcompile.fix(model)" in str(problems[1]) and "register it as a parameter" in str(problems[0]).lower()
    with pytest.raises(dpcompile.DPCompileError, match="BatchNorm1d"):
        dpcompile.validate(model, strict=True)
    model.scale.requires_grad_(False)
    weight = model.bn.weight
    with torch.no_grad():
        weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fix: still trains the same tensors
    assert dpcompile.fix(model) is model and dpcompile.validate(model) == []
    assert isinstance(model.bn, nn.GroupNorm) and model.bn.num_groups == math.gcd(32, 48) == 16
    assert model.bn.weight is weight and model.gn.num_groups == 3
    assert isinstance(dpcompile.fix(nn.BatchNorm2d(6)), nn.GroupNorm)  # a BatchNorm root: a new module
    ref = nn.GroupNorm(16, 48)
    ref.load_state_dict(model.bn.state_dict())
    h = torch.randn(7, 48)
    torch.testing.assert_close(model.bn(h), ref(h))

    x, y = _data(7).tensors
    expected = reference_clipped_grads(model, lambda m, a, b: m(a, b), (x, y), max_grad_norm=0.7, clipping="per_layer")
    compiled = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=0.7, clipping="per_layer",
                                 loss_reduction="sum")
    compiled(x, y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=1e-4, atol=1e-5, msg=name)
    dp = dpcompile.DPOptimizer(optimizer, noise_multiplier=0.0, max_grad_norm=0.7, expected_batch_size=7.0)
    before = weight.detach().clone()
    dp.step()
    assert not torch.equal(weight.detach(), before)  # trained through the optimizer built before fix
    assert dpcompile.ModuleValidator.is_valid(model)


def test_validate_reports_pooling_after_a_trainable_layer_and_other_refusals():
    model = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                          nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.Embedding(5, 2, scale_grad_by_freq=True),
                          nn.CrossEntropyLoss(weight=torch.ones(2)))
    assert [(p.path, p.kind) for p in dpcompile.validate(model)] == [
        ("2", "pooling"), ("4", "unsupported_gradient"), ("6", "unsupported_gradient"), ("7", "sample_mixing_loss")]
