"""Run a test case through a flashdp backend and through the float64 oracles, and compare.

The compiled side wraps model + loss in one module (attribute `m`), so the loss is inside the graph and its
separability is checked; parameter names therefore carry an `m.` prefix there, stripped before comparing.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import dpcompile
from dpcompile.testing import oracle


class LossModule(nn.Module):
    def __init__(self, model, loss_fn, mean: bool):
        super().__init__()
        self.m = model
        self.loss_fn = loss_fn
        self.mean = mean

    def forward(self, *batch):
        loss = self.loss_fn(self.m, *batch)
        return loss / batch[0].shape[0] if self.mean else loss


def _prefixed(options: dict) -> dict:
    """Options as the compiled LossModule sees them (parameter names under `m.`)."""
    out = dict(options)
    if not isinstance(out.get("clipping", "per_layer"), str):
        out["clipping"] = [["m." + n for n in g] for g in out["clipping"]]
    return out


def compiled_grads(case, batch, **options):
    model = compiled_model(case, batch, **options)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def compiled_model(case, batch, *, backend="flashdp_eager", dtype=torch.float64, dynamic=True, **options):
    """A copy of case.model after one compiled forward and backward on `batch` (its .grad hold the clipped sums)."""
    model = copy.deepcopy(case.model).to(dtype)
    batch = tuple(b.to(dtype) if b.is_floating_point() else b for b in batch)
    wrapper = LossModule(model, case.loss_fn, options.get("loss_reduction", "mean") == "mean")
    torch._dynamo.reset()
    options = _prefixed(options)
    if dynamic:
        compiled = dpcompile.compile(wrapper, backend=backend, **options)
    else:
        compiled = torch.compile(wrapper, backend=backend, options=options, fullgraph=True)
    compiled(*batch).backward()
    return model


def oracle_grads(case, batch, *, max_grad_norm=1.0, clipping="per_layer", clip_fn="abadi", oracle_kind="loop", **_):
    groups = oracle.default_groups(case.model, clipping) if isinstance(clipping, str) else clipping
    if isinstance(max_grad_norm, dict):  # explicit groups are named group0, group1, ... by dpcompile
        thresholds = [max_grad_norm[f"group{i}"] for i in range(len(groups))]
        max_grad_norm = 1.0
    else:
        thresholds = None
    return oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=max_grad_norm,
                                          clipping=groups, clip_fn=clip_fn, oracle=oracle_kind,
                                          thresholds=thresholds)


def assert_matches(case, batch, *, atol=1e-9, rtol=1e-7, oracle_kind="loop", **options):
    """Returns the compiled copy of the model (compiled_model), whose .grad were compared."""
    model = compiled_model(case, batch, **options)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = oracle_grads(case, batch, oracle_kind=oracle_kind, **options)
    _assert_close(case, got, want, atol, rtol, options)
    return model


#: the sweep every site kind's test file runs (tests/test_site_*.py): flat and per-layer clipping, each with every
#: sample clipped (small C) and none clipped (large C: catches scaling bugs that clipping hides), both reductions
SMALL_C, LARGE_C = 1e-3, 1e6
SITE_SWEEP = [("flat", SMALL_C, "sum"), ("flat", LARGE_C, "mean"), ("per_layer", SMALL_C, "mean"),
              ("per_layer", LARGE_C, "sum")]
SITE_BATCHES = (0, 1, 2, 5)


def assert_matches_batches(case, sizes=SITE_BATCHES, *, atol=1e-9, rtol=1e-7, dtype=torch.float64, **options):
    """assert_matches at each batch size in `sizes`, on one compiled model (B >= 2 share one graph; B = 0 and B = 1
    get their own)."""
    model = copy.deepcopy(case.model).to(dtype)
    wrapper = LossModule(model, case.loss_fn, options.get("loss_reduction", "mean") == "mean")
    torch._dynamo.reset()
    compiled = dpcompile.compile(wrapper, backend=options.pop("backend", "flashdp_eager"), **_prefixed(options))
    for B in sizes:
        batch = case.batch(B, seed=B)
        for p in model.parameters():
            p.grad = None
        compiled(*(b.to(dtype) if b.is_floating_point() else b for b in batch)).backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        _assert_close(case, got, oracle_grads(case, batch, **options), atol, rtol, dict(options, B=B))


def site_sweep(case, *others):
    """Parametrize a test over (case, combo): `case` with every combo of SITE_SWEEP, each of `others` with one."""
    import pytest

    pairs = [(case, c) for c in SITE_SWEEP] + [(o, SITE_SWEEP[i % len(SITE_SWEEP)]) for i, o in enumerate(others)]
    return pytest.mark.parametrize("case,combo", pairs, ids=["-".join(map(str, (c.name, *k))) for c, k in pairs])


def assert_site_combo(case, combo, sizes=SITE_BATCHES):
    """assert_matches_batches under one (clipping, C, loss_reduction) of SITE_SWEEP."""
    clipping, C, reduction = combo
    assert_matches_batches(case, sizes, max_grad_norm=C, clipping=clipping, loss_reduction=reduction)


def site_kinds(case, B: int, seed: int = 0, **options) -> dict:
    """{parameter name: the site kinds its gradient contracts at, as dpcompile.explain reports them} at batch size B
    ("zero" for an empty batch)."""
    wrapper = LossModule(copy.deepcopy(case.model), case.loss_fn, options.get("loss_reduction", "mean") == "mean")
    plan = dpcompile.explain(wrapper, case.batch(B, seed=seed), **_prefixed(options))
    return {r["parameter"].removeprefix("m."): tuple(p.split("(")[0] for p in r["pattern"].split(" + "))
            if r["pattern"] != "-" else ("zero",) for r in plan.rows}


def _assert_close(case, got: dict, want: dict, atol: float, rtol: float, options: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    # A parameter whose true gradient cancels to ~0 (LayerNorm over one feature, k.bias under softmax) holds
    # only rounding noise of the terms that cancelled: measure that noise against the largest gradient.
    overall = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
    for name in want:
        g = got[name]
        assert g is not None, f"{case.name}: `{name}` got no gradient"
        w = want[name]
        err = (g.double() - w).abs().max().item() if w.numel() else 0.0
        scale = w.abs().max().item() if w.numel() else 0.0
        assert err <= atol + rtol * scale + 1e-12 * overall, f"{case.name} {name}: max err {err:.3e} (scale {scale:.3e}) {options}"


def unwrap(exc: BaseException) -> BaseException:
    """Dynamo wraps backend errors in BackendCompilerFailed; the cause is the dpcompile error."""
    while getattr(exc, "inner_exception", None) is not None:
        exc = exc.inner_exception
    return exc


class CountingBackend:
    """flashdp_eager, counting the graphs it compiled (a compile the pass refused counts as none)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kw):
        out = dpcompile.flashdp_eager(gm, example_inputs, **kw)
        self.graphs += 1
        return out
