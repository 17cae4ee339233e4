"""Batch-dim rules and gradient maps that transformers architectures need (issue 24 item 6, benchmarks/hf_sweep.py):
`repeat` (DiffLlama's value heads, Qwen4-Exp's hyper-connections), `view_as_complex` / `view_as_real` (Llama 4's
complex rotary embedding), the chunking of linear attention (a reshape into chunks of a padded length;
`linalg_solve_triangular` stays refused), Mamba's selective scan (torch's generic associative_scan: a stack of per-sample tensors), a parameter split into
pieces used on their own (DeepSeek-V4's hyper-connection `base.split`: the backward's cat is placed per sample), and a parameter transformed by softplus before an elementwise use (Apertus's xIELU
`alpha_p`, RecurrentGemma's RG-LRU `recurrent_param`: the backward applies softplus' derivative, a `where` with a
batch-free condition, to the gradient summed over the batch; it is a fixed linear map, applied to each sample's
gradient on its own). Each against the float64 batch-of-one oracle at B in {0, 1, 2, 5}, small and large C, flat
and per_layer clipping; what must stay refused is refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
from dp_check import SITE_SWEEP, LossModule, oracle_grads, unwrap

import models


class RepeatHeads(nn.Module):
    """DiffLlama: v.repeat(1, 2, 1, 1) over heads; Qwen4-Exp: h.repeat(1, 1, k) over features; and a repeat that
    tiles the batch dim itself, folded back by a view and a sum."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):  # (B, T, 3)
        B, T = x.shape[:2]
        h = self.lin(x)
        v = h.view(B, T, 2, 4).transpose(1, 2)  # (B, 2, T, 4)
        a, _ = torch.chunk(v, 2, dim=1)
        h2 = (a.repeat(1, 2, 1, 1) * v).transpose(1, 2).reshape(B, T, 8)
        h3 = h2.repeat(1, 1, 2)[..., 4:12]
        tiled = torch.tanh(h3).repeat(2, 1, 1).view(2, B, T, 8).sum(0)  # rows of the batch dim tiled
        return self.out(tiled).squeeze(-1)


class ComplexRope(nn.Module):
    """Llama 4: torch.view_as_complex of (..., 2) pairs, times polar frequencies, torch.view_as_real back."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):  # (B, T, 3)
        h = self.lin(x)
        T = h.shape[1]
        pos = torch.arange(T, dtype=h.dtype)[:, None] * torch.arange(1, 5, dtype=h.dtype)
        freqs = torch.polar(torch.ones_like(pos), pos)
        hc = torch.view_as_complex(h.reshape(*h.shape[:-1], 4, 2))
        r = torch.view_as_real(hc * freqs).flatten(2)
        return self.out(torch.tanh(r)).squeeze(-1)


class SoftplusScalars(nn.Module):
    """Apertus's xIELU: softplus(alpha_p) (a (1,) parameter) times x * x under torch.where; RecurrentGemma's RG-LRU:
    softplus(recurrent_param) (a (d,) parameter) times a per-sample gate; and a clamp of a parameter."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 1)
        self.alpha_p = nn.Parameter(torch.tensor([0.8]))
        self.recurrent_param = nn.Parameter(torch.randn(4))
        self.gate = nn.Parameter(torch.tensor([0.3, -2.0, 0.5, 4.0]))

    def forward(self, x):  # (B, T, 3)
        h = self.lin(x)
        h = h * F.softplus(self.recurrent_param) * self.gate.clamp(-1.0, 1.0)
        a = F.softplus(self.alpha_p)
        h = torch.where(h > 0, a * h * h + 0.5 * h, torch.expm1(torch.clamp(h, max=0.0)) - h)
        return self.out(h).squeeze(-1)


class ChunkedDeltaRule(nn.Module):
    """The chunking of Qwen3-Next / OLMo-Hybrid / Lara's torch_chunk_gated_delta_rule: the sequence padded to a
    multiple of the chunk, reshaped into chunks (a size with FloorDiv / Mod under a dynamic length, which the
    analysis cannot prove for every length: dpcompile.compile recompiles with the length static), a unit
    lower-triangular mixing within each chunk (the models solve it with torch.linalg.solve_triangular, which stays
    refused: test below; here a matmul), reshaped back and cut to the length."""

    def __init__(self):
        super().__init__()
        self.k, self.v, self.out = nn.Linear(3, 8), nn.Linear(3, 8), nn.Linear(4, 1)
        self.solve = False

    def forward(self, x):  # (B, T, 3)
        B, T, chunk = x.shape[0], x.shape[1], 4
        k = F.normalize(self.k(x).view(B, T, 2, 4).transpose(1, 2), dim=-1)  # (B, H, T, d)
        v = self.v(x).view(B, T, 2, 4).transpose(1, 2)
        pad = (chunk - T % chunk) % chunk
        k, v = (F.pad(t, (0, 0, 0, pad)).reshape(B, 2, (T + pad) // chunk, chunk, 4) for t in (k, v))
        A = torch.tril(k @ k.transpose(-1, -2), diagonal=-1) * 0.5 + torch.eye(chunk, dtype=k.dtype)
        u = A @ v if not self.solve else torch.linalg.solve_triangular(A, v, upper=False, unitriangular=True)
        y = u.reshape(B, 2, T + pad, 4)[:, :, :T].transpose(1, 2)  # (B, T, H, d)
        return self.out(y).sum(2).squeeze(-1)


class SplitParameter(nn.Module):
    """DeepSeek-V4's hyper-connections: `pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])`, each piece
    used elementwise or in a matmul; and a parameter unbound into rows, one of them unused (its gradient piece is
    zeros). The backward concatenates the pieces' gradients, each summed over the batch: placed per sample."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 1)
        self.base = nn.Parameter(torch.randn(4 + 4 + 16) * 0.5)
        self.rows = nn.Parameter(torch.randn(3, 4) * 0.5)

    def forward(self, x):  # (B, T, 3)
        pre, post, comb = self.base.split([4, 4, 16])
        a, b, _unused = self.rows.unbind(0)
        h = self.lin(x)
        h = torch.sigmoid(h * 0.5 + pre) * post + (h @ comb.view(4, 4)) * a + b * torch.tanh(h)
        return self.out(h).squeeze(-1)


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_left * a_right, a_right * b_left + b_right


class SelectiveScan(nn.Module):
    """Mamba / Falcon-Mamba / Jamba's mamba_selective_scan under Dynamo: torch's generic associative_scan of
    h_t = a_t * h_{t-1} + b_t along time, whose interleave step stacks per-sample tensors (decomposed into a cat
    along the batch dim of whole rounds of samples, then a view); and a torch.stack along dim 0 directly."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):  # (B, T, 3)
        from torch._higher_order_ops.associative_scan import associative_scan

        a = torch.sigmoid(self.a(x)).transpose(1, 2)  # (B, 4, T)
        b = self.b(x).transpose(1, 2)
        _, h = associative_scan(_combine, (a, b), dim=2, combine_mode="generic")
        both = torch.stack([h, torch.tanh(h)], dim=0).sum(0)  # (2, B, 4, T) -> (B, 4, T)
        return self.out(both.transpose(1, 2)).squeeze(-1)


def _batch(B, g):
    return torch.randn(B, 5, 3, generator=g), torch.randn(B, 5, generator=g)


def _case(name, build):
    return models.Case(name, models._build(0, build), _batch, lambda m, x, y: models.mse_sum(m(x), y))


CASES = {"repeat": lambda: _case("repeat", RepeatHeads),
         "view_as_complex": lambda: _case("view_as_complex", ComplexRope),
         "softplus_scalars": lambda: _case("softplus_scalars", SoftplusScalars),
         "chunked_delta_rule": lambda: _case("chunked_delta_rule", ChunkedDeltaRule),
         "selective_scan": lambda: _case("selective_scan", SelectiveScan),
         "split_parameter": lambda: _case("split_parameter", SplitParameter)}


@pytest.mark.filterwarnings("ignore:dpcompile. gradient of parameter.*Recompiling with the sequence dims static")
@pytest.mark.parametrize("clipping,C,reduction", SITE_SWEEP)
@pytest.mark.parametrize("name", list(CASES))
def test_exact_against_the_oracle(name, clipping, C, reduction):
    case = CASES[name]()
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, reduction == "mean"), backend="flashdp_eager",
                                 max_grad_norm=C, clipping=clipping, loss_reduction=reduction)
    # torch's generic associative_scan itself fails on an empty batch (its interleave stacks (1, 0, ..) with
    # (2, 0, ..)); CausalLMLoss never runs the model at B = 0
    for B in (1, 2, 5) if name == "selective_scan" else (0, 1, 2, 5):
        batch = tuple(b.double() for b in case.batch(B, seed=B + 1))
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle_grads(case, batch, max_grad_norm=C, clipping=clipping)
        overall = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
        for n, p in model.named_parameters():
            assert p.grad is not None, (name, n, B)
            err = (p.grad - want[n]).abs().max().item()
            assert err <= 1e-9 + 1e-7 * want[n].abs().max().item() + 1e-12 * overall, (name, n, B, C, clipping, err)


class AffineWhere(nn.Module):
    """A where whose other branch is a batch-free non-zero value is affine in the gradient, not linear: the pass
    must not drop that branch. (Built directly in a custom autograd Function's backward.)"""

    class _F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w * 1.0

        @staticmethod
        def backward(ctx, g):
            return torch.where(torch.ones_like(g, dtype=torch.bool).logical_not(), g, torch.ones_like(g))

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x * self._F.apply(self.w)).sum(-1)


def test_where_with_a_batch_free_nonzero_branch_is_refused():
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(models._build(0, AffineWhere), lambda m, x: m(x).pow(2).sum(), False),
                                 backend="flashdp_eager", max_grad_norm=1.0, loss_reduction="sum")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 4)).backward()
    assert isinstance(unwrap(info.value), dpcompile.DPCompileError), info.value


def test_solve_triangular_stays_refused():
    """The gated delta rule's torch.linalg.solve_triangular has no batch-dim rule: with one (batched over the
    leading dims), Qwen3.5 / Qwen3-Next ran and were exact in float64 (1e-12 of the largest entry), but in float32
    their decay parameters (dt_bias, A_log) differed from the float64 oracle by up to 4e-3 of the largest entry,
    30-400 times a plain compile's rounding: refused until that is understood."""
    model = models._build(0, ChunkedDeltaRule)
    model.solve = True
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, lambda m, x: m(x).pow(2).sum(), False), backend="flashdp_eager",
                                 max_grad_norm=1.0, loss_reduction="sum", dynamic_seq=False)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 5, 3)).backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.UnsupportedGradientError) and "linalg_solve_triangular" in str(err), err


class CatWithShared(nn.Module):
    """A concatenation along the batch dim of per-sample rows and rows every sample shares: still refused."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.shared = nn.Parameter(torch.randn(1, 2))

    def forward(self, x):
        h = torch.cat([self.lin(x), self.shared.expand(x.shape[0], 2)], 0)  # (2B, 2)
        return h.view(2, x.shape[0], 2).prod(0).sum(-1)


def test_cat_of_per_sample_and_shared_rows_along_the_batch_is_refused():
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(models._build(0, CatWithShared), lambda m, x: m(x).pow(2).sum(), False),
                                 backend="flashdp_eager", max_grad_norm=1.0, loss_reduction="sum")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 3)).backward()
    assert isinstance(unwrap(info.value), dpcompile.DPCompileError), info.value


class RepeatThenMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):  # repeat tiles the batch dim, then a cumsum along it combines samples
        return self.lin(x).repeat(2, 1).cumsum(0)[: x.shape[0]].sum(-1)


def test_repeat_over_the_batch_then_an_op_across_it_is_refused():
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(models._build(0, RepeatThenMix), lambda m, x: m(x).pow(2).sum(), False),
                                 backend="flashdp_eager", max_grad_norm=1.0, loss_reduction="sum")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 3)).backward()
    assert isinstance(unwrap(info.value), dpcompile.SampleMixingError), info.value


def _decorated(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # like transformers' can_return_tuple / auto_docstring around forward
        return fn(*args, **kwargs)

    return wrapper


class ReassignsAttribute(nn.Module):
    """CTRL: `self.pos_encoding = self.pos_encoding.to(...)` in a decorated forward, a graph break."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    @_decorated
    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent Python branching
            y = y * 2
        return y


def test_graph_break_in_a_decorated_forward_names_its_module_and_line():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ReassignsAttribute()

        def forward(self, x):
            return self.block(x).sum()

    torch._dynamo.reset()
    with pytest.raises(dpcompile.GraphBreakError) as info:
        dpcompile.compile(Net(), backend="flashdp_eager", loss_reduction="sum")(torch.randn(4, 3)).backward()
    msg = str(info.value)
    assert "`block` (ReassignsAttribute)" in msg and "if y.sum() > 0:" in msg, msg
