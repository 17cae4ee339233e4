"""Trainable parameters the forward never uses (issue 24 item 6: cross-attention of decoders, vision and audio
towers of a causal LM): under fullgraph their .grad stays None, as in eager PyTorch, the used ones are the oracle's
clipped sums (C_g counted over every group of the model), and DPOptimizer still noises them as a zero clipped sum.
Without fullgraph, a parameter missing from a graph may be the other side of a graph break: refused at compile.
A gradient that reaches an unused parameter later from eager code is refused by DPOptimizer at step."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dpcompile
from dpcompile import DPOptimizer
from dpcompile.testing import oracle

from dp_check import SITE_SWEEP, unwrap


class WithUnused(nn.Module):
    def __init__(self, d: int = 4, unused: int = 4):
        super().__init__()
        self.a = nn.Linear(3, d)
        self.cross = nn.Linear(unused, unused)  # e.g. a decoder's cross-attention, never reached by a causal LM
        self.b = nn.Linear(d, 1)

    def forward(self, x, y):
        return ((self.b(torch.tanh(self.a(x))) - y) ** 2).sum(-1)


class Loss(nn.Module):
    def __init__(self, m, mean: bool):
        super().__init__()
        self.m, self.mean = m, mean

    def forward(self, x, y):
        per_sample = self.m(x, y)
        return per_sample.mean() if self.mean else per_sample.sum()


def _batch(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("clipping,C,reduction", SITE_SWEEP)
def test_unused_parameter_keeps_none_and_used_ones_are_exact(clipping, C, reduction):
    torch.manual_seed(0)
    model = WithUnused().double()
    wrapper = Loss(copy.deepcopy(model), reduction == "mean")
    torch._dynamo.reset()
    dp = dpcompile.compile(wrapper, backend="flashdp_eager", max_grad_norm=C, clipping=clipping,
                           loss_reduction=reduction)
    for B in (0, 1, 2, 5):
        x, y = _batch(B, B)
        wrapper.zero_grad(set_to_none=True)
        dp(x, y).backward()
        # .grad is the clipped sum of the per-sample gradients under either reduction (the optimizer divides);
        # the oracle's groups are every trainable parameter's (cross included): C_g = C / sqrt(G) over all of them
        want = oracle.reference_clipped_grads(model, lambda m, x, y: m(x, y).sum(), (x, y), max_grad_norm=C, clipping=clipping)
        for n, p in wrapper.m.named_parameters():
            if n.startswith("cross."):
                assert p.grad is None, (n, B)
                assert not want[n].abs().max() > 0
                continue
            assert p.grad is not None, (n, B)
            torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-12, msg=f"{n} B={B}")


def _train_step(model, sigma=1.0, C=1.0, **opt_kwargs):
    wrapper = Loss(model, mean=False)
    torch._dynamo.reset()
    dp = dpcompile.compile(wrapper, backend="flashdp_eager", max_grad_norm=C, clipping="flat", loss_reduction="sum")
    dp(*(t.float() for t in _batch(4, 0))).backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=C,
                      expected_batch_size=1.0, loss_reduction="sum", **opt_kwargs)
    return dp, opt


def test_optimizer_noises_the_unused_parameter():
    """Like Opacus, every trainable parameter gets noise: an unused one the noise of a zero clipped sum."""
    torch.manual_seed(0)
    model = WithUnused(unused=96)
    before = model.cross.weight.detach().clone()
    _, opt = _train_step(model, sigma=0.7, C=2.0)
    assert model.cross.weight.grad is None
    opt.step()
    update = (before - model.cross.weight.detach()).flatten()
    assert abs(update.std().item() / (0.7 * 2.0) - 1) < 0.05
    assert abs(update.mean().item()) < 4 * 1.4 / 96


def test_eager_gradient_on_the_unused_parameter_is_refused_at_step():
    torch.manual_seed(0)
    model = WithUnused()
    _, opt = _train_step(model)
    model.cross(torch.randn(2, 4)).sum().backward()  # eager code outside the compiled call: nothing clips it
    with pytest.raises(dpcompile.CoverageError, match="cross.weight|no flashdp graph"):
        opt.step()


@pytest.mark.filterwarnings("ignore:flashdp. Linear returns")
def test_second_graph_over_the_unused_parameter_is_counted_in_the_sensitivity():
    """Another fullgraph flashdp graph clips the parameter the first one never used, on the same samples: each
    clips its own part to C, so one sample's gradient is bounded by sqrt(2) C only; the optimizer refuses C."""
    torch.manual_seed(0)
    model = WithUnused()
    wrapper = Loss(model, mean=False)
    torch._dynamo.reset()
    opts = dict(backend="flashdp_eager", max_grad_norm=1.0, clipping="flat", loss_reduction="sum")
    dp = dpcompile.compile(wrapper, **opts)
    side = dpcompile.compile(model.cross, **opts)
    x, y = (t.float() for t in _batch(4, 0))
    (dp(x, y) + side(torch.randn(4, 4)).square().sum()).backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=1.0, loss_reduction="sum")
    with pytest.raises(dpcompile.DPCompileError, match="under-noised"):
        opt.step()


class BreakBetweenLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x, y):
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()  # e.g. a print: b's parameters are in a second graph
        return ((self.b(h) - y) ** 2).sum()


@pytest.mark.filterwarnings("ignore:flashdp. BreakBetweenLayers returns")
def test_graph_break_leaving_parameters_to_another_graph_is_still_refused():
    torch._dynamo.reset()
    compiled = torch.compile(BreakBetweenLayers(), backend="flashdp_eager", fullgraph=False,
                             options={"max_grad_norm": 1.0, "clipping": "flat", "loss_reduction": "sum"})
    with pytest.raises(Exception) as info:
        compiled(*(t.float() for t in _batch(4, 0))).backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.CoverageError), err
    assert "not in this compiled graph" in str(err) and "fullgraph=True" in str(err)


def test_unused_parameter_without_fullgraph_is_still_refused():
    """torch.compile without fullgraph: the backend cannot tell an unused parameter from one behind a break."""
    torch._dynamo.reset()
    compiled = torch.compile(Loss(WithUnused(), mean=False), backend="flashdp_eager",
                             options={"max_grad_norm": 1.0, "clipping": "flat", "loss_reduction": "sum"})
    with pytest.raises(Exception) as info:
        compiled(*(t.float() for t in _batch(4, 0))).backward()
    assert isinstance(unwrap(info.value), dpcompile.CoverageError)
