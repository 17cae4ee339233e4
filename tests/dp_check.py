"""Run a test case through a flashdp backend and through the float64 oracles, and compare."""
from __future__ import annotations

import copy

import torch
from torch import nn

import dpcompile
from dpcompile.testing import oracle


class LossModule(nn.Module):
    """model + loss in one module, so that the loss is inside the compiled graph (its separability is checked)."""

    def __init__(self, model, loss_fn, mean: bool):
        super().__init__()
        self.m = model
        self.loss_fn = loss_fn
        self.mean = mean

    def forward(self, *batch):
        loss = self.loss_fn(self.m, *batch)
        return loss / batch[0].shape[0] if self.mean else loss


def compiled_grads(case, batch, *, backend="flashdp_eager", dtype=torch.float64, dynamic=True, **options):
    model = copy.deepcopy(case.model).to(dtype)
    batch = tuple(b.to(dtype) if b.is_floating_point() else b for b in batch)
    wrapper = LossModule(model, case.loss_fn, options.get("loss_reduction", "mean") == "mean")
    torch._dynamo.reset()
    if dynamic:
        compiled = dpcompile.compile(wrapper, backend=backend, **options)
    else:
        compiled = torch.compile(wrapper, backend=backend, options=options, fullgraph=True)
    compiled(*batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def oracle_grads(case, batch, *, max_grad_norm=1.0, clipping="per_layer", clip_fn="abadi", oracle_kind="loop", **_):
    if isinstance(max_grad_norm, dict):
        groups = oracle.default_groups(case.model, clipping) if isinstance(clipping, str) else clipping
        raise NotImplementedError
    return oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=max_grad_norm,
                                          clipping=clipping, clip_fn=clip_fn, oracle=oracle_kind)


def assert_matches(case, batch, *, atol=1e-9, rtol=1e-7, **options):
    got = compiled_grads(case, batch, **options)
    want = oracle_grads(case, batch, **options)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        g = got[name]
        if g is None:
            g = torch.zeros_like(want[name])
        w = want[name]
        err = (g.double() - w).abs().max().item() if w.numel() else 0.0
        scale = w.abs().max().item() if w.numel() else 0.0
        assert err <= atol + rtol * scale, f"{case.name} {name}: max err {err:.3e} (scale {scale:.3e}) {options}"
