"""Separable models that the pass once refused with a message claiming that samples mix (issue 24 item 5).

Each is compared with the float64 batch-of-one oracle at small C (everything clipped) with flat clipping for B in
{0, 1, 2, 5}, and at large C (nothing clipped) with per_layer clipping for B in {2, 5}: one compiled module per
(C, style), whose graphs for B = 0, B = 1 and B >= 2 Dynamo tells apart (kept to 4 graphs a model, so that the file
runs in about a minute on one core). Where a model must stay refused, the message says what really happens.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.lowering  # noqa: F401  Inductor's max_pool decomposition reads it without importing it
import torch.nn.functional as F
from torch import nn

import models
import dpcompile
from dp_check import LossModule, oracle_grads, unwrap


def _regression(in_shape, out_shape):
    return models._regression_batch(in_shape, out_shape)


# ---- (a) GroupNorm ------------------------------------------------------------------------------------------


class GroupNorms(nn.Module):
    """GroupNorm on a (N, C) and on a (N, C, L) input."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.gn2, self.gn3 = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)

    def forward(self, x):  # x (B, L, 3)
        h = self.inp(x)  # (B, L, 4)
        h3 = torch.tanh(self.gn3(h.transpose(1, 2))).transpose(1, 2)  # (B, L, 4)
        h2 = torch.tanh(self.gn2(h.mean(1)))  # (B, 4)
        return self.out(h3 + h2.unsqueeze(1))


def _mse(m, x, y):
    return models.mse_sum(m(x), y)


# ---- (b) cross_entropy with one target per sample, reduction mean ------------------------------------------


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def _class_batch(B, g=None):
    g = g if g is not None else torch.Generator().manual_seed(0)
    return torch.randn(B, 3, generator=g), torch.randint(0, 5, (B,), generator=g)


# ---- (c) sliced / reused parameters ---------------------------------------------------------------------------


class SlicedPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.pos = nn.Parameter(torch.randn(6, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, idx):  # idx (B, T), T <= 6
        return self.out(torch.tanh(self.emb(idx) + self.pos[: idx.shape[1]]))


def _token_regression(B, g=None):
    g = g if g is not None else torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (B, 3), generator=g), torch.randn(B, 3, 2, generator=g)


class ReusedWeight(nn.Module):
    """One weight used by a linear, sliced elementwise (W[:3]) and summed (W.sum(0))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x (B, 3)
        W = self.lin.weight  # (4, 3)
        h = self.lin(x)  # (B, 4)
        h = h + (x * W[:3].sum(0)).sum(-1, keepdim=True)  # W[:3] elementwise
        h = h * W.sum(1)  # W.sum(1): (4,)
        h = h + x @ W[:2].t().sum(-1, keepdim=True)  # sliced weight in a matmul
        return self.out(torch.tanh(h))


# ---- (e) gather / scatter_add / index_add on non-batch dims, (d) in-place slice assignment ---------------------


class GatherScatter(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.cls, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("idx", torch.tensor([2, 0, 3, 0]))

    def forward(self, x):  # x (B, T, 3)
        h = torch.tanh(self.inp(x))  # (B, T, 4)
        B, T, D = h.shape
        order = h.detach().argsort(-1)  # per-sample indices
        g = torch.gather(h, 2, self.idx.view(1, 1, D).expand(B, T, D)) + torch.gather(h, 2, order)
        g = g + torch.gather(h, 1, order[:, :1].expand(B, T, D) % T)  # along time, per-sample indices
        s = torch.zeros_like(h).scatter_add(2, self.idx.view(1, 1, D).expand(B, T, D), h)
        s = s + torch.zeros_like(h).scatter_add(2, order, h * h)
        a = torch.zeros_like(h).index_add(2, self.idx, h * 0.5) + torch.zeros_like(h).index_add(1, self.idx[:T] % T, h)
        wide = h.new_zeros(B, T, 6).scatter_add(2, order + 2, h).index_add(2, self.idx + 1, h)  # other sizes
        h = g + s + a + torch.gather(wide, 2, order + 1)
        h[:, 0] = self.cls(x[:, 0]) * 2  # (d) in-place slice assignment
        return self.out(h)


# ---- (f) max_pool2d, adaptive pools, circular padding ---------------------------------------------------------


class PoolPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
        self.out = nn.Linear(3, 2)

    def forward(self, x):  # x (B, 2, 4, 4)
        t = torch.tanh(self.conv(x))
        h = F.max_pool2d(t, 2) + F.adaptive_avg_pool2d(t, (2, 2)) + F.adaptive_max_pool2d(t, (2, 2))  # (B, 3, 2, 2)
        return self.out(h.mean((2, 3)))


# ---- (g) MultiheadAttention with key_padding_mask -------------------------------------------------------------


class MHAPadding(nn.Module):
    """key_padding_mask with the attention weights returned: baddbmm, batch-first and time-major."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.tm = nn.MultiheadAttention(4, 2)  # (T, B, d)
        self.out = nn.Linear(4, 2)

    def forward(self, x, mask):  # x (B, T, 4), mask (B, T) bool, True = padding
        h, w = self.mha(x, x, x, key_padding_mask=mask)  # need_weights: the attention is baddbmm, not SDPA
        xt = x.transpose(0, 1)
        ht, _ = self.tm(xt, xt, xt, key_padding_mask=mask, average_attn_weights=False)
        return self.out(h + ht.transpose(0, 1)) + w[..., :1] * 0.5


def _mha_batch(B, g=None):
    g = g if g is not None else torch.Generator().manual_seed(0)
    mask = torch.rand(B, 3, generator=g) < 0.3
    mask[:, 0] = False  # every sample keeps one key
    return torch.randn(B, 3, 4, generator=g), mask, torch.randn(B, 3, 2, generator=g)


# ---- (h) LoRA merged, weight_norm -----------------------------------------------------------------------------


class LoRAWeightNorm(nn.Module):
    """A frozen W0 plus a merged LoRA product, next to a weight_norm parametrization."""

    def __init__(self):
        super().__init__()
        self.w0 = nn.Parameter(torch.randn(4, 3), requires_grad=False)
        self.A = nn.Parameter(torch.randn(4, 2) * 0.5)
        self.B = nn.Parameter(torch.randn(2, 3) * 0.5)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.w0 + self.A @ self.B)) + torch.tanh(self.wn(x)))


# ---- (i) EmbeddingBag -----------------------------------------------------------------------------------------


class Bags(nn.Module):
    """nn.EmbeddingBag on a (B, L) input (one bag per sample): sum with per-sample weights, mean with a padding
    index (an empty bag), max."""

    def __init__(self):
        super().__init__()
        self.sum = nn.EmbeddingBag(7, 4, mode="sum")
        self.mean = nn.EmbeddingBag(7, 4, mode="mean", padding_idx=0)
        self.max = nn.EmbeddingBag(7, 4, mode="max")
        self.out = nn.Linear(4, 2)

    def forward(self, idx):
        w = (idx.float() + 1).to(self.out.weight.dtype) / 7
        h = self.sum(idx, per_sample_weights=w) + self.mean(idx) + self.max(idx)
        return self.out(torch.tanh(h))


def _bag_batch(B, g=None):
    g = g if g is not None else torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (B, 3), generator=g)
    if B:
        idx[0] = 0  # with padding_idx=0: an empty bag
    return idx, torch.randn(B, 2, generator=g)


class SplitHeads(nn.Module):
    """Fused QKV split by sizes along the feature dim (Falcon, GPT-BigCode, Mamba mixers): the split dim is the
    op's third argument (its second holds the sizes)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(2, 1)

    def forward(self, x):
        a, b = self.lin(x).split([2, 4], dim=-1)
        c, d = b.chunk(2, dim=-1)
        return self.out(torch.tanh(a) * c + d)


class _RegionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return torch.tanh(self.fc(x))


class NestedRegions(nn.Module):
    """Repeated blocks marked with torch.compiler.nested_compile_region (issue 21 item 5's way of compiling a block
    once). Each block's parameters are their own, so the per-sample norms must see through every call of the
    region. Dynamo hands the backend invoke_subgraph calls, whose bodies AOTAutograd would compile apart (the pass
    refused them); the backend inlines the bodies first (backend.inline_compile_regions)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_RegionBlock() for _ in range(3))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _case(name, build, make_batch, loss_fn=_mse):
    return models.Case(name, models._build(0, build), make_batch, loss_fn)


CASES = {
    "groupnorm": lambda: _case("groupnorm", GroupNorms, _regression((5, 3), (5, 2))),
    "cross_entropy_mean": lambda: _case("cross_entropy_mean", Classifier, _class_batch,
                                        lambda m, x, y: F.cross_entropy(m(x), y) * x.shape[0]),
    "sliced_positions": lambda: _case("sliced_positions", SlicedPositions, _token_regression),
    "reused_weight": lambda: _case("reused_weight", ReusedWeight, _regression((3,), (2,))),
    "gather_scatter_slice_assign": lambda: _case("gather_scatter_slice_assign", GatherScatter,
                                                 _regression((3, 3), (3, 2))),
    "pool_circular_pad": lambda: _case("pool_circular_pad", PoolPad, _regression((2, 4, 4), (2,))),
    "mha_key_padding": lambda: _case("mha_key_padding", MHAPadding, _mha_batch,
                                     lambda m, x, mask, y: models.mse_sum(m(x, mask), y)),
    "lora_weight_norm": lambda: _case("lora_weight_norm", LoRAWeightNorm, _regression((3,), (2,))),
    "embedding_bag": lambda: _case("embedding_bag", Bags, _bag_batch),
    "split_with_sizes_chunk": lambda: _case("split_with_sizes_chunk", SplitHeads, _regression((4,), (1,))),
    "nested_compile_region": lambda: _case("nested_compile_region", NestedRegions, _regression((4,), (2,))),
}


def _check(case, Bs, C, clipping):
    """One compiled module (graphs for B = 0, B = 1 and B >= 2), each batch against the float64 oracle."""
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, True), backend="flashdp_eager", max_grad_norm=C,
                                 clipping=clipping, loss_reduction="mean")
    for B in Bs:
        batch = tuple(b.double() if b.is_floating_point() else b for b in case.batch(B, seed=B + 1))
        for p in model.parameters():
            p.grad = None
        compiled(*batch).backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        want = oracle_grads(case, batch, max_grad_norm=C, clipping=clipping)
        assert set(got) == set(want)
        overall = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
        for name, w in want.items():
            g = got[name]
            assert g is not None, f"{case.name} B={B}: `{name}` got no gradient"
            err = (g - w).abs().max().item() if w.numel() else 0.0
            scale = w.abs().max().item() if w.numel() else 0.0
            assert err <= 1e-9 + 1e-7 * scale + 1e-12 * overall, f"{case.name} B={B} C={C} {clipping} {name}: {err:.3e}"


@pytest.mark.parametrize("name", list(CASES))
def test_small_c_flat(name):
    """Everything clipped, one group: B = 0, 1 (graphs of their own) and B = 2, 5 (one graph)."""
    _check(CASES[name](), (0, 1, 2, 5), 1e-3, "flat")


@pytest.mark.parametrize("name", list(CASES))
def test_large_c_per_layer(name):
    """Nothing clipped (catches scaling bugs that clipping hides), a group per layer."""
    _check(CASES[name](), (2, 5), 1e3, "per_layer")


class _MeanCE(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = models._build(0, Classifier)

    def forward(self, x, y):
        return F.cross_entropy(self.m(x), y)  # reduction="mean", ignore_index=-100: divides by the count of targets


def test_cross_entropy_default_mean():
    """The user's own mean loss (not the harness's sum / B), compiled as is: exact while no target is ignored; a
    batch with a target equal to ignore_index is stopped at run time, since the count it divides by then depends on
    other samples' labels."""
    model = _MeanCE().double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=1e-3, clipping="flat",
                                 loss_reduction="mean")
    x, y = _class_batch(5, torch.Generator().manual_seed(3))
    x = x.double()
    compiled(x, y).backward()
    want = oracle_grads(models.Case("ce", model.m, None, lambda m, x, y: F.cross_entropy(m(x), y, reduction="sum")),
                        (x, y), max_grad_norm=1e-3, clipping="flat")
    for n, p in model.m.named_parameters():
        assert (p.grad - want[n]).abs().max().item() <= 1e-9 + 1e-7 * want[n].abs().max().item(), n
    y[2] = -100
    with pytest.raises(RuntimeError, match="ignore_index=-100.*not a mean of per-sample losses"):
        compiled(x, y).backward()


def test_ignore_index_in_use_is_still_refused_at_compile_time():
    """An explicit ignore_index (a token mean over padded targets) keeps its compile-time refusal."""
    model = models._build(0, Classifier).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, lambda m, x, y: F.cross_entropy(m(x), y, ignore_index=0), False),
                                 backend="flashdp_eager", max_grad_norm=1.0, loss_reduction="mean")
    x, y = _class_batch(4)
    with pytest.raises(Exception) as info:
        compiled(x.double(), y).backward()
    assert isinstance(unwrap(info.value), dpcompile.SampleMixingError)


def test_embedding_bag_with_own_offsets_is_refused():
    """A 1-D input with the user's offsets may put several samples in one bag: refused, saying so."""
    bag = models._build(0, lambda: nn.EmbeddingBag(7, 4, mode="sum")).double()

    def loss_fn(m, idx):  # idx (B, 3), but bags of 2 over the flattened ids: bag 1 takes samples 0 and 1
        flat = idx.flatten()
        return m(flat, torch.arange(0, flat.shape[0], 2)).pow(2).sum()

    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(bag, loss_fn, False), backend="flashdp_eager", max_grad_norm=1.0,
                                 loss_reduction="sum")
    with pytest.raises(Exception) as info:
        compiled(torch.randint(0, 7, (4, 3))).backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.UnsupportedGradientError) and "bags are not one per sample" in str(err), err


def test_op_after_the_batch_sum_is_refused_without_claiming_mixing():
    """A parameter transformed by an op the pass has no per-sample rule for (W.cumsum(0)): the backward applies that
    op to the gradient already summed over the batch. Refused, saying so, not that samples mix."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4, bias=False)

        def forward(self, x):
            return x @ self.lin.weight.cumsum(0).t()

    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(models._build(0, M), lambda m, x: m(x).pow(2).sum(), False),
                                 backend="flashdp_eager", max_grad_norm=1.0, loss_reduction="sum")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 3)).backward()
    err = unwrap(info.value)
    assert type(err) is dpcompile.UnsupportedGradientError, err
    assert "m.lin.weight" in str(err) and "summed over the batch" in str(err) and "samples do not mix" in str(err)

