"""One compiled model for every batch size: B >= 2 without recompiling, B = 1 and B = 0 correct."""
from __future__ import annotations

import copy

import torch

import dpcompile
import models
from dp_check import LossModule
from dpcompile.testing import oracle


def test_one_graph_for_all_batch_sizes_and_correct_tiny_batches():
    case = models.gpt_like(tied=True)
    model = copy.deepcopy(case.model).double()
    calls = []

    def counting_backend(gm, example_inputs, **kw):
        calls.append(len(example_inputs))
        return dpcompile.flashdp_eager(gm, example_inputs, **kw)

    torch._dynamo.reset()
    opts = dict(max_grad_norm=0.7, clipping="per_layer", loss_reduction="mean")
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, True), backend=counting_backend, **opts)
    for B in [3, 2, 5, 7, 1, 0, 4]:
        batch = case.batch(B, seed=B)
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=0.7,
                                              clipping="per_layer")
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], atol=1e-9, rtol=1e-7, msg=f"B={B} {name}")
    # one symbolic graph for B >= 2, plus Dynamo's specialised graphs for B = 1 and B = 0
    assert len(calls) == 3, calls


def test_gradient_accumulation_sums_clipped_sums():
    case = models.mlp(input_ndim=3)
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, False), backend="flashdp_eager",
                                 max_grad_norm=0.2, clipping="flat", loss_reduction="sum")
    b1, b2 = case.batch(3, seed=1), case.batch(4, seed=2)
    compiled(*(t.double() for t in b1)).backward()
    compiled(*(t.double() for t in b2)).backward()
    w1 = oracle.reference_clipped_grads(case.model, case.loss_fn, b1, max_grad_norm=0.2)
    w2 = oracle.reference_clipped_grads(case.model, case.loss_fn, b2, max_grad_norm=0.2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, w1[name] + w2[name], atol=1e-9, rtol=1e-7)


def test_batch_on_another_input_and_dim():
    """batch_arg / batch_dim: samples along dim 1 of the second input."""
    lin = torch.nn.Linear(3, 2).double()

    class TimeMajor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, scale, x):  # x: (T, B, 3)
            return (self.lin(x) * scale).pow(2).sum()

    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(TimeMajor(), backend="flashdp_eager", fullgraph=True,
                             options={"max_grad_norm": 0.1, "clipping": "flat", "loss_reduction": "sum",
                                      "batch_arg": "x", "batch_dim": 1})
    compiled(torch.tensor(2.0, dtype=torch.float64), x).backward()
    per = oracle.per_sample_grads_loop(lin, lambda m, xb: (m(xb.transpose(0, 1)) * 2.0).pow(2).sum(),
                                       (x.transpose(0, 1),))
    want = oracle.clipped_sum(per, [["weight", "bias"]], [0.1], "abadi")
    torch.testing.assert_close(lin.weight.grad, want["weight"], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(lin.bias.grad, want["bias"], atol=1e-9, rtol=1e-7)


def test_two_compiles_of_one_model_keep_their_own_options():
    """Dynamo caches compiled code per code object: a second compile with another C must not reuse the first."""
    case = models.mlp()
    model = copy.deepcopy(case.model).double()
    batch = tuple(t.double() for t in case.batch(4, seed=9))
    torch._dynamo.reset()
    compiled = {C: dpcompile.compile(LossModule(model, case.loss_fn, False), backend="flashdp_eager",
                                     max_grad_norm=C, clipping="flat", loss_reduction="sum") for C in (0.01, 100.0)}
    for C in (0.01, 100.0, 0.01):
        model.zero_grad(set_to_none=True)
        compiled[C](*batch).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=C)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], atol=1e-9, rtol=1e-7, msg=f"C={C} {name}")
