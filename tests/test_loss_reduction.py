"""The declared loss_reduction is checked against the graph (issue 24 item 4, dpcompile/passes/loss_reduction.py):
each loss form real code writes is either exact against the float64 oracle under the reduction it is (sum, mean,
token mean, cross_entropy's default mean) or refused with LossReductionError naming the declared and the found
reduction; a loss whose form cannot be read is refused too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
from dpcompile.compile import _caused_by
from dpcompile.errors import DPCompileError, LossReductionError
from dpcompile.testing import oracle

pytestmark = pytest.mark.filterwarnings("ignore:flashdp")

D, T, V = 4, 3, 5


class Net(nn.Module):
    def __init__(self, loss):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, V)
        self.loss = loss

    def logits(self, x):
        return self.out(torch.tanh(self.lin(x)))

    def forward(self, x, y):
        return self.loss(self, x, y)


def _sq(m, x, y):  # (B, T) regression on the first logit
    return (m.logits(x)[..., 0] - y) ** 2


# (name, compiled loss, the oracle's SUM of per-sample losses (None: refused), declared reduction, integer targets?)
FORMS = [
    ("sum", lambda m, x, y: _sq(m, x, y).sum(), lambda m, x, y: _sq(m, x, y).sum(), "sum", False),
    ("sum / B", lambda m, x, y: _sq(m, x, y).sum() / x.shape[0], lambda m, x, y: _sq(m, x, y).sum(), "mean", False),
    ("mean over B*T", lambda m, x, y: _sq(m, x, y).mean(), lambda m, x, y: _sq(m, x, y).mean(1).sum(), "mean", False),
    ("per-sample means, then mean", lambda m, x, y: _sq(m, x, y).mean(1).mean(),
     lambda m, x, y: _sq(m, x, y).mean(1).sum(), "mean", False),
    ("sum / (B*T)", lambda m, x, y: _sq(m, x, y).sum() / (x.shape[0] * x.shape[1]),
     lambda m, x, y: _sq(m, x, y).mean(1).sum(), "mean", False),
    ("0.5 * sum + a constant", lambda m, x, y: 0.5 * _sq(m, x, y).sum() + 3.0,
     lambda m, x, y: 0.5 * _sq(m, x, y).sum(), "sum", False),
    ("sum of a sum and a mean/B*B", lambda m, x, y: _sq(m, x, y).sum() + _sq(m, x, y).mean() * x.shape[0],
     lambda m, x, y: _sq(m, x, y).sum() + _sq(m, x, y).mean(1).sum(), "sum", False),
    ("cross_entropy default mean, (B*T,) tokens",
     lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten()),
     lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten(), reduction="sum") / T, "mean", True),
    ("cross_entropy sum / B", lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten(),
                                                              reduction="sum") / x.shape[0],
     lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten(), reduction="sum"), "mean", True),
    # refused: the declared reduction is not the loss's
    ("sum declared mean", lambda m, x, y: _sq(m, x, y).sum(), None, "mean", False),
    ("mean declared sum", lambda m, x, y: _sq(m, x, y).mean(), None, "sum", False),
    ("sum / B declared sum", lambda m, x, y: _sq(m, x, y).sum() / x.shape[0], None, "sum", False),
    ("sum / a fixed expected batch size declared mean", lambda m, x, y: _sq(m, x, y).sum() / 256, None, "mean", False),
    ("cross_entropy default mean declared sum",
     lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten()), None, "sum", True),
    # refused: not one reduction of per-sample terms
    ("a sum plus a mean", lambda m, x, y: _sq(m, x, y).sum() + _sq(m, x, y).mean(), None, "mean", False),
    ("sum / (B - 1)", lambda m, x, y: _sq(m, x, y).sum() / (x.shape[0] - 1), None, "mean", False),
]


def _batch(B, ints):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g) if ints else torch.randn(B, T, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("form", FORMS, ids=[f[0] for f in FORMS])
def test_loss_form_is_exact_or_refused_by_its_reduction(form):
    name, loss, per_sample_sum, declared, ints = form
    torch._dynamo.reset()
    model = Net(loss).double()
    compiled = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=1e-2, clipping="flat",
                                 loss_reduction=declared)
    for B in (2, 5):
        model.zero_grad(set_to_none=True)
        x, y = _batch(B, ints)
        if per_sample_sum is None:
            with pytest.raises(Exception) as info:
                compiled(x, y).backward()
            err = _caused_by(info.value, LossReductionError)
            assert err is not None, f"{name}: {info.value!r}"
            assert f"loss_reduction={declared!r}" in str(err)
            return
        compiled(x, y).backward()
        want = oracle.reference_clipped_grads(model, lambda m, xb, yb: per_sample_sum(m, xb, yb), (x, y),
                                              max_grad_norm=1e-2, clipping="flat")
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], atol=1e-9, rtol=1e-7, msg=lambda m: f"{name} B={B} {n}: {m}")


def test_refusal_names_declared_and_found_reduction():
    torch._dynamo.reset()
    compiled = dpcompile.compile(Net(lambda m, x, y: _sq(m, x, y).sum()).double(), backend="flashdp_eager",
                                 loss_reduction="mean")
    with pytest.raises(Exception) as info:
        compiled(*_batch(3, False)).backward()
    msg = str(_caused_by(info.value, LossReductionError))
    assert "loss_reduction='mean' is declared" in msg and "a sum over samples" in msg and "x.shape[0]" in msg


def test_static_batch_size_reads_literals_either_way():
    """Compiled for one static B, x.shape[0] is a literal: `sum / B` is accepted as a mean, a plain sum declared
    "mean" and a mean declared "sum" are still refused (no literal could be the batch size)."""
    x, y = _batch(2, False)
    for loss, declared, ok in ((lambda m, x, y: _sq(m, x, y).sum() / x.shape[0], "mean", True),
                               (lambda m, x, y: _sq(m, x, y).sum(), "mean", False),
                               (lambda m, x, y: _sq(m, x, y).mean(), "sum", False)):
        torch._dynamo.reset()
        compiled = torch.compile(Net(loss).double(), backend="flashdp_eager", fullgraph=True, dynamic=False,
                                 options={"max_grad_norm": 1.0, "loss_reduction": declared})
        if ok:
            compiled(x, y).backward()
        else:
            with pytest.raises(Exception) as info:
                compiled(x, y).backward()
            assert _caused_by(info.value, LossReductionError) is not None


def test_loss_divided_by_a_data_dependent_count_is_refused():
    """A normaliser computed from the data of the whole batch (a mask's sum) is no reduction of per-sample terms."""
    def masked_mean(m, x, y):
        mask = (y > 0).double()
        return (_sq(m, x, y) * mask).sum() / mask.sum()

    torch._dynamo.reset()
    compiled = dpcompile.compile(Net(masked_mean).double(), backend="flashdp_eager", loss_reduction="mean")
    with pytest.raises(Exception) as info:
        compiled(*_batch(3, False)).backward()
    assert _caused_by(info.value, DPCompileError) is not None


def test_cross_entropy_token_mean_with_an_ignored_target_is_refused_at_run_time():
    torch._dynamo.reset()
    compiled = dpcompile.compile(Net(lambda m, x, y: F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten())).double(),
                                 backend="flashdp_eager", loss_reduction="mean")
    x, y = _batch(3, True)
    compiled(x, y).backward()
    y[1, 2] = -100
    with pytest.raises(Exception, match="ignore_index"):
        compiled(x, y).backward()
