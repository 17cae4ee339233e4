"""Refusals: graphs that mix samples, gradients through ops the pass cannot privatize, bad setups.

Each must raise a dpcompile error naming the parameter and the op, never return a non-private gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
import models
from dp_check import LossModule, unwrap


def _run(model, loss_fn, batch, **options):
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, loss_fn, False), backend="flashdp_eager",
                                 **{"loss_reduction": "sum", **options})
    try:
        compiled(*batch).backward()
    except Exception as e:  # Dynamo wraps backend errors
        raise unwrap(e) from None


def test_batchnorm_in_training_is_refused():
    case = models.batchnorm_model()
    with pytest.raises(dpcompile.SampleMixingError, match=r"m\.\d\.(weight|bias).*reduction over the batch"):
        _run(case.model, case.loss_fn, case.batch(4))


def test_in_batch_contrastive_loss_is_refused():
    case = models.inbatch_loss_model()
    with pytest.raises(dpcompile.DPCompileError, match=r"m\.weight"):
        _run(case.model, case.loss_fn, case.batch(4))


def test_token_mean_with_ignore_index_is_refused():
    """Mean over non-ignored tokens of the whole batch: the normaliser couples samples."""
    case = models.gpt_like()

    def loss_fn(m, idx, tgt):
        return F.cross_entropy(m(idx).flatten(0, 1), tgt.flatten(), ignore_index=0)

    with pytest.raises(dpcompile.SampleMixingError, match="combines samples"):
        _run(case.model, loss_fn, case.batch(3))


def test_loss_normalised_by_a_batch_statistic_is_refused():
    model = nn.Linear(3, 2)

    def loss_fn(m, x):
        out = m(x)
        return out.pow(2).sum() / out.detach().abs().sum()

    with pytest.raises(dpcompile.SampleMixingError):
        _run(model, loss_fn, (torch.randn(4, 3),))


def test_cumsum_over_the_batch_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(dpcompile.SampleMixingError, match=r"m\.(weight|bias)"):
        _run(model, lambda m, x: m(x).cumsum(0).pow(2).sum(), (torch.randn(4, 3),))


def test_unsupported_op_names_parameter_and_op():
    """Transposed convolutions have no per-sample rule yet: refuse, naming both."""
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 1))
    with pytest.raises(dpcompile.UnsupportedGradientError, match=r"m\.0\.weight.*transposed convolution"):
        _run(model, lambda m, x: m(x).pow(2).sum(), (torch.randn(4, 2, 4, 4),))


def test_op_unknown_to_the_analysis_is_refused():
    """An op without a batch-dim rule on a gradient path (here a per-sample matrix exponential)."""
    model = nn.Linear(3, 3)
    with pytest.raises(dpcompile.UnsupportedGradientError, match=r"m\.(weight|bias).*does not know"):
        _run(model, lambda m, x: torch.linalg.matrix_exp(m(x).view(-1, 3, 3) * 0.1).sum(), (torch.randn(4, 3, 3),))


def test_scale_grad_by_freq_is_refused():
    model = nn.Embedding(5, 3, scale_grad_by_freq=True)
    with pytest.raises(dpcompile.UnsupportedGradientError, match="scale_grad_by_freq"):
        _run(model, lambda m, i: m(i).pow(2).sum(), (torch.randint(0, 5, (4, 2)),))


def test_regulariser_in_the_loss_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(dpcompile.UnsupportedGradientError, match=r"m\.weight.*does not depend on the batch"):
        _run(model, lambda m, x: m(x).pow(2).sum() + m.weight.pow(2).sum(), (torch.randn(4, 3),))


def test_graph_break_splitting_a_flat_group_is_refused():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    torch._dynamo.reset()
    compiled = torch.compile(Broken(), backend="flashdp_eager", options={"clipping": "flat"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 3)).sum().backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.CoverageError) and "fullgraph=True" in str(err)


def test_unknown_option_is_refused_at_compile():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(2, 2), backend="flashdp_eager", options={"max_grad_norm": 1.0, "C": 2})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 2))
    assert isinstance(unwrap(info.value), dpcompile.OptionsError) and "'C'" in str(unwrap(info.value))


def test_parameter_used_in_eager_code_is_refused():
    """dpcompile.compile uses fullgraph=True: an eager region inside forward (where a parameter's gradient
    would escape clipping) is a compile error, not a silent plain gradient."""
    class Escapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            return _eager_scale(self.b(self.a(x)), self.b.bias)

    torch._dynamo.reset()
    compiled = dpcompile.compile(Escapes(), backend="flashdp_eager", clipping="per_param")
    with pytest.raises(Exception, match="(?i)disable|graph break|skip"):
        compiled(torch.randn(4, 3)).sum().backward()


def test_unused_trainable_parameter_is_refused_with_advice():
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model["used"](x), backend="flashdp_eager")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 3)).sum().backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.CoverageError) and "unused.weight" in str(err) and "requires_grad" in str(err)


@torch._dynamo.disable
def _eager_scale(x, bias):
    return x * bias.sum()


def test_loss_outside_the_compiled_call_is_allowed_with_one_warning():
    """A model returning per-sample outputs, summed outside: allowed (exact), with a warning naming the fix."""
    torch._dynamo.reset()
    model = nn.Linear(3, 2).double()
    dp = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", max_grad_norm=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"Linear returns tensors of shapes \(\*, 2\), not a scalar loss.*Move the loss inside"):
        dp(x).square().sum().backward()
    from dpcompile.testing import oracle

    want = oracle.reference_clipped_grads(model, lambda m, x: m(x).square().sum(), (x,), max_grad_norm=0.1,
                                          clipping="per_layer")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n])


def test_trainable_tensor_that_is_not_a_parameter_is_refused_at_compile_time():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = torch.ones(3, requires_grad=True)  # trainable, but no nn.Parameter: nothing would clip it

        def forward(self, x):
            return (self.lin(x) * self.scale).sum()

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        dpcompile.compile(Scaled(), backend="flashdp_eager", loss_reduction="sum")(torch.randn(4, 3)).backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.CoverageError) and "`scale`" in str(err) and "nn.Parameter" in str(err)


def test_graph_break_names_the_module_and_the_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            if y.sum() > 0:  # data-dependent Python branching: a graph break
                y = y * 2
            return y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Branchy()

        def forward(self, x):
            return self.block(x).sum()

    torch._dynamo.reset()
    with pytest.raises(dpcompile.GraphBreakError) as info:
        dpcompile.compile(Net(), backend="flashdp_eager", loss_reduction="sum")(torch.randn(4, 3)).backward()
    msg = str(info.value)
    assert "`block` (Branchy)" in msg and "if y.sum() > 0:" in msg and "test_refusals.py line" in msg


def test_hf_labels_loss_is_refused_before_dynamo_runs():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                                                 n_positions=16))
    ids = torch.randint(0, 32, (3, 8))
    with pytest.raises(dpcompile.SampleMixingError, match=r"GPT2LMHeadModel.*CausalLMLoss"):
        dpcompile.compile(model, backend="flashdp_eager")(ids, labels=ids)
