"""The product backend (Inductor code generation) on a few cases; the eager backend carries the sweep."""
from __future__ import annotations

import logging

import pytest
import torch

import models
from dp_check import assert_matches
from dpcompile.backend import build_context  # noqa: F401  (import check)
from dpcompile.passes import DPJointPass, ParamInfo, PassContext
from dpcompile.options import DPOptions

pytestmark = pytest.mark.inductor
F32 = dict(dtype=torch.float32, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("case,opts", [
    (models.mlp(input_ndim=3), dict(max_grad_norm=0.05, clipping="flat", loss_reduction="sum")),
    (models.gpt_like(tied=True), dict(max_grad_norm=0.5, clipping="per_layer", loss_reduction="mean")),
    (models.mha(), dict(max_grad_norm=1e6, clipping="per_param", clip_fn="automatic", loss_reduction="sum")),
    (models.gpt_like(tied=False), dict(max_grad_norm=0.05, clipping="per_layer", strategy="single_pass")),
    (models.mlp(input_ndim=3), dict(max_grad_norm=0.05, clipping="flat", strategy="ghost", loss_reduction="mean")),
    (models.gpt_like(tied=False), dict(max_grad_norm=0.05, clipping="flat", strategy="stored", loss_reduction="mean")),
], ids=["mlp3d-flat", "gpt-tied-per_layer", "mha-per_param", "gpt-single_pass", "mlp3d-ghost", "gpt-flat-stored"])
def test_inductor_matches_oracle(case, opts, caplog):
    with caplog.at_level(logging.INFO, logger="dpcompile"):
        assert_matches(case, case.batch(3, seed=11), backend="flashdp", **F32, **opts)
    if case.name.startswith("gpt_like") and opts["clipping"] == "per_layer":
        # two identical blocks: the second block's inlined op bodies are copies of the first's traces (checked
        # against fresh traces in verify mode, tests/conftest.py), and the gradients above still match the oracle
        line = next(r.getMessage() for r in caplog.records if "op bodies traced for inlining" in r.getMessage())
        assert int(line.replace(",", "").split()[7]) >= 1, line


def test_options_change_the_cache_key():
    """Inductor's FX/AOT caches are on disk and shared: a cached graph built for another C must never be reused."""
    def uuid(**kw):
        opts = DPOptions.parse(kw)
        ctx = PassContext(opts, {0: ParamInfo("w", "g")}, {1: 0}, {"g": opts.threshold_for("g", 1)}, {})
        return DPJointPass(ctx).uuid()

    base = uuid(max_grad_norm=0.1)
    assert base == uuid(max_grad_norm=0.1)
    for change in [dict(max_grad_norm=0.2), dict(max_grad_norm=0.1, clip_fn="automatic"),
                   dict(max_grad_norm=0.1, loss_reduction="sum"), dict(max_grad_norm=0.1, clipping="flat"),
                   dict(max_grad_norm=0.1, batch_dim=1), dict(max_grad_norm=0.1, strategy="ghost"),
                   dict(max_grad_norm=0.1, single_pass_budget_mb=1.0)]:
        assert uuid(**change) != base, change


def test_cache_key_hashes_the_graph_sources_only(tmp_path):
    """The compiled-graph cache key hashes the sources that decide the rewritten graph (passes/, codegen/,
    options.py, clipping.py, backend.py's decomposition table), not the rest of the package: editing the CLI must
    not invalidate compiled graphs, editing the pass must."""
    import shutil
    from pathlib import Path

    import dpcompile
    from dpcompile import passes

    package = Path(dpcompile.__file__).resolve().parent
    assert passes.source_hash() == passes._source_hash(package)
    root = tmp_path / "dpcompile"
    shutil.copytree(package, root, ignore=shutil.ignore_patterns("__pycache__"))
    base = passes._source_hash(root)
    assert base == passes.source_hash()

    def edited(rel, old=None, new="\n# an edit\n"):
        path = root / rel
        text = path.read_text()
        path.write_text(text + new if old is None else text.replace(old, new, 1))
        try:
            return passes._source_hash(root)
        finally:
            path.write_text(text)

    assert edited("cli.py") == base
    assert edited("privacy/optimizer.py") == base
    assert edited("backend.py") == base  # outside dp_decomposition_table: its PassContext is in PassContext.key()
    (root / "notes.py").write_text("x = 1\n")
    assert passes._source_hash(root) == base
    (root / "notes.py").unlink()
    for rel in ("passes/plan.py", "passes/__init__.py", "passes/driver.py", "passes/sites/linear.py",
                "codegen/ops.py", "codegen/kernels/linear.py", "options.py", "clipping.py", "strategy_registry.py"):
        assert edited(rel) != base, rel
    assert edited("backend.py", "aten.embedding_dense_backward.default", "aten.embedding_dense_backward.default, "
                  "aten.addmm.default") != base


def test_second_threshold_is_not_served_from_cache():
    case = models.mlp()
    for C in (0.01, 0.02):  # same graph structure, different C: the second compile must not reuse the first
        assert_matches(case, case.batch(4, seed=3), backend="flashdp", max_grad_norm=C, clipping="flat",
                       loss_reduction="sum", **F32)


@pytest.mark.parametrize("B", [0, 1])
def test_inductor_tiny_batches(B):
    case = models.gpt_like(tied=True, n_layer=1)
    assert_matches(case, case.batch(B, seed=5), backend="flashdp", max_grad_norm=0.2, clipping="flat",
                   loss_reduction="mean", **F32)


@pytest.mark.parametrize("strategy", ["auto", "randomized"])
def test_evaluation_under_no_grad_between_training_steps(strategy):
    """An evaluation loop under torch.no_grad() with the compiled model: Inductor compiles an inference graph (no
    tangents), which the DP pass leaves alone (reading it as a joint graph failed every such call); first before
    any training call, then between training steps, whose clipped sums still match the oracle."""
    import dpcompile
    from dp_check import LossModule, _assert_close, oracle_grads

    case = models.mlp(input_ndim=3)
    opts = dict(max_grad_norm=0.05, clipping="per_layer", loss_reduction="sum")
    torch._dynamo.reset()
    loss_module = LossModule(case.model, case.loss_fn, False)
    compiled = dpcompile.compile(loss_module, backend="flashdp", strategy=strategy,
                                 **({"probes": 4} if strategy == "randomized" else {}), **opts)
    for step in range(2):
        batch = case.batch(3, seed=step)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*batch), loss_module(*batch), rtol=1e-5, atol=1e-6)
        case.model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        got = {n: p.grad for n, p in case.model.named_parameters()}
        if strategy == "auto":
            _assert_close(case, got, oracle_grads(case, batch, **opts), F32["atol"], F32["rtol"], opts)
        else:  # estimated norms: every gradient there, finite
            assert all(g is not None and torch.isfinite(g).all() for g in got.values())
