"""Mixture-of-experts routing (issue 24 item 6). Per (token, expert) pair: the router's top-k, each pair gathering its
expert's weights by id (`W[expert_ids]`) and one batched matmul, the pairs summed back per token: each expert
weight's gradient is a scatter-add of per-token products by expert id, clipped per sample like an embedding table's.
transformers' `batched_mm` experts path is this computation; dpcompile.hf.per_token_experts (called by
disable_hub_kernels, hence CausalLMLoss and dpcompile.compile) switches every transformers MoE model to it. The
`grouped_mm` path sorts the whole batch's pairs by expert id and stays refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
from dp_check import SITE_SWEEP, LossModule, oracle_grads, unwrap

import models

E, K, D, FF = 4, 2, 6, 8


class PerTokenExperts(nn.Module):
    """A Mixtral-style sparse MoE block in plain PyTorch, as transformers' batched_mm path computes it."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, D), nn.Linear(D, 1)
        self.router = nn.Linear(D, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * FF, D) / D ** 0.5)
        self.down = nn.Parameter(torch.randn(E, D, FF) / FF ** 0.5)
        self.down_bias = nn.Parameter(torch.randn(E, D) * 0.1)

    def forward(self, x):  # (B, T, 3)
        B, T = x.shape[:2]
        h = torch.tanh(self.inp(x)).reshape(-1, D)  # (B*T, D): tokens of every sample, flattened
        weights, ids = torch.topk(F.softmax(self.router(h), dim=-1), K, dim=-1)  # (B*T, K)
        weights = weights / weights.sum(-1, keepdim=True)
        ids = ids.reshape(-1)  # (S,) = (B*T*K,)
        hs = h.repeat_interleave(K, dim=0)  # (S, D)
        gate, up = torch.bmm(self.gate_up[ids], hs.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.down[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1) + self.down_bias[ids]
        y = (y * weights.reshape(-1, 1)).view(B * T, K, D).sum(1)
        return self.out(y.view(B, T, D)).squeeze(-1)


def _batch(B, g):
    return torch.randn(B, 5, 3, generator=g), torch.randn(B, 5, generator=g)


@pytest.mark.parametrize("clipping,C,reduction", SITE_SWEEP)
def test_per_token_experts_exact(clipping, C, reduction):
    case = models.Case("moe", models._build(0, PerTokenExperts), _batch, lambda m, x, y: models.mse_sum(m(x), y))
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, reduction == "mean"), backend="flashdp_eager",
                                 max_grad_norm=C, clipping=clipping, loss_reduction=reduction)
    for B in (0, 1, 2, 5):
        batch = tuple(b.double() for b in case.batch(B, seed=B + 1))
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle_grads(case, batch, max_grad_norm=C, clipping=clipping)
        for n, p in model.named_parameters():
            assert p.grad is not None, (n, B)
            err = (p.grad - want[n]).abs().max().item()
            assert err <= 1e-9 + 1e-7 * want[n].abs().max().item(), (n, B, C, clipping, err)


def _tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).double().train()


def test_causal_lm_loss_switches_transformers_experts_to_batched_mm():
    model = _tiny_mixtral()
    assert model.config._experts_implementation != "batched_mm"
    dpcompile.hf.CausalLMLoss(model)
    assert model.config._experts_implementation == "batched_mm"


def test_mixtral_through_causal_lm_loss_is_exact():
    from dpcompile.testing.oracle import clipped_sum, default_groups, default_thresholds, per_sample_grads_loop

    wrapper = dpcompile.hf.CausalLMLoss(_tiny_mixtral())
    ids = torch.randint(12, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    per_sample = per_sample_grads_loop(wrapper, lambda m, *s: m(*s), (ids,), dtype=torch.float64)
    groups = default_groups(wrapper, "per_layer")
    want = clipped_sum(per_sample, groups, default_thresholds(1e-3, len(groups)), "abadi")
    torch._dynamo.reset()
    dpcompile.compile(wrapper, backend="flashdp_eager", max_grad_norm=1e-3, clipping="per_layer",
                      loss_reduction="mean")(ids).backward()
    for n, p in wrapper.named_parameters():  # transformers computes the router and attention softmax in float32
        err = (p.grad - want[n]).abs().max().item()
        assert err <= 1e-5 * want[n].abs().max().item(), (n, err)


def test_grouped_mm_path_sorting_the_batch_is_refused():
    """Compiled without dpcompile's wrappers (plain torch.compile with the backend), the default grouped_mm path
    sorts every (token, expert) pair of the batch by expert id: refused as mixing samples, at the sort."""
    model = _tiny_mixtral()
    model.set_experts_implementation("grouped_mm")

    class Loss(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            logits = self.m(input_ids=ids).logits[:, :-1]
            return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1).sum()

    torch._dynamo.reset()
    compiled = torch.compile(Loss(model), backend="flashdp_eager", fullgraph=True,
                             options={"max_grad_norm": 1.0, "loss_reduction": "sum"})
    with pytest.raises(Exception) as info:
        compiled(torch.randint(12, 64, (3, 6))).backward()
    err = unwrap(info.value)
    assert isinstance(err, dpcompile.SampleMixingError) and "sort" in str(err), err
    assert "per_token_experts(model)" in str(err), err  # the refusal names the exact twin
