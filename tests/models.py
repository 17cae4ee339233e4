"""Zoo of tiny deterministic test models, each with a per-sample-decomposable loss and a batch maker.

Every factory builds its model under a private RNG seeded with `seed` (the global RNG is left
untouched) and returns a `Case`. No model has dropout; all are valid in train() mode.

Loss semantics (`Case.loss_reduction`), always a SUM over samples of a per-sample loss l_i:
  "sum":          l_i sums over all of sample i's elements/tokens (e.g. cross_entropy(reduction="sum")).
  "sum_of_means": l_i is the mean over sample i's tokens/elements; the loss sums these means.
`Case.per_sample` is False for models whose batch samples interact (batchnorm_model, inbatch_loss_model):
they have no per-sample gradients and exist for refusal tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, ...]


@dataclass
class Case:
    name: str
    model: nn.Module
    make_batch: Callable[[int, Optional[torch.Generator]], Batch]  # make_batch(B, generator)
    loss_fn: Callable[..., torch.Tensor]  # loss_fn(model, *batch) -> scalar, SUM over samples
    loss_reduction: str = "sum"  # "sum" | "sum_of_means", see the module docstring
    per_sample: bool = True  # False: samples interact, the compiler must refuse

    def batch(self, B: int, seed: int = 0) -> Batch:
        return self.make_batch(B, torch.Generator().manual_seed(seed))


def _build(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn().train()


def _gen(g: Optional[torch.Generator]) -> torch.Generator:
    return g if g is not None else torch.Generator().manual_seed(0)


# ---- losses ---------------------------------------------------------------------------------------

def mse_sum(out, y):
    return (out - y).pow(2).sum()


def mse_sum_of_means(out, y):
    return (out - y).pow(2).flatten(1).mean(1).sum()


def ce_sum(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")


def ce_sum_of_means(logits, targets):
    tok = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    return tok.reshape(targets.shape).flatten(1).mean(1).sum()


# ---- batch makers ---------------------------------------------------------------------------------

def _regression_batch(in_shape, out_shape):
    def make(B, g=None):
        g = _gen(g)
        return torch.randn(B, *in_shape, generator=g), torch.randn(B, *out_shape, generator=g)
    return make


def _token_batch(vocab, T):
    """(inputs, next-token targets), both (B, T) int64; token 0 (padding) occurs."""
    def make(B, g=None):
        tok = torch.randint(0, vocab, (B, T + 1), generator=_gen(g))
        return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    return make


# ---- MLP ------------------------------------------------------------------------------------------

def mlp(d_in=3, hidden=4, d_out=2, depth=2, bias=True, input_ndim=2, T=3, U=2, seed=0) -> Case:
    """`depth` Linear layers with tanh between; inputs (B, d_in), (B, T, d_in) or (B, T, U, d_in).
    Loss: MSE sum vs a random target in the batch."""
    dims = [d_in] + [hidden] * (depth - 1) + [d_out]

    def build():
        layers = []
        for i in range(depth):
            layers += [nn.Linear(dims[i], dims[i + 1], bias=bias)] + ([nn.Tanh()] if i < depth - 1 else [])
        return nn.Sequential(*layers)

    lead = {2: (), 3: (T,), 4: (T, U)}[input_ndim]
    return Case(f"mlp{input_ndim}d", _build(seed, build), _regression_batch((*lead, d_in), (*lead, d_out)),
                lambda m, x, y: mse_sum(m(x), y))


# ---- GPT-like -------------------------------------------------------------------------------------

def _causal_attention(q, k, v, kind):
    """q, k, v: (B, H, T, hd)."""
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]
    att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _norm(kind, d):
    return {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}[kind](d)


class _GPTAttention(nn.Module):
    def __init__(self, d, n_head, attn):
        super().__init__()
        assert d % n_head == 0
        self.n_head, self.attn = n_head, attn
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = _causal_attention(q, k, v, self.attn)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class _GPTBlock(nn.Module):
    def __init__(self, d, n_head, norm, attn):
        super().__init__()
        self.ln1, self.ln2 = _norm(norm, d), _norm(norm, d)
        self.attn = _GPTAttention(d, n_head, attn)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTLike(nn.Module):
    def __init__(self, vocab, d, n_head, n_layer, T, tied, norm, attn, padding_idx):
        super().__init__()
        self.wte = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(_GPTBlock(d, n_head, norm, attn) for _ in range(n_layer))
        self.ln_f = _norm(norm, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_like(vocab=11, d=8, n_head=2, n_layer=2, T=5, tied=True, norm="layernorm", attn="sdpa",
             padding_idx=None, seed=0) -> Case:
    """GPT-2 style LM (pre-norm, fused qkv, GELU MLP, learned positions, optional tied head).
    Batch (idx, targets) (B, T) int64. Loss: CE sum over all tokens."""
    model = _build(seed, lambda: GPTLike(vocab, d, n_head, n_layer, T, tied, norm, attn, padding_idx))
    name = f"gpt_like_{norm}_{attn}{'_tied' if tied else ''}{'_pad' if padding_idx is not None else ''}"
    return Case(name, model, _token_batch(vocab, T), lambda m, idx, tgt: ce_sum(m(idx), tgt))


# ---- Llama-like -----------------------------------------------------------------------------------

def _rope(x):
    """Rotary embedding of x (..., T, hd) at positions arange(T) (rotate-half form; odd tail kept)."""
    T, half = x.shape[-2], x.shape[-1] // 2
    if half == 0:
        return x
    inv_freq = 1.0 / 10000 ** (torch.arange(half, device=x.device, dtype=x.dtype) / half)
    ang = torch.arange(T, device=x.device, dtype=x.dtype)[:, None] * inv_freq
    cos, sin = ang.cos(), ang.sin()
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], -1)


class _LlamaAttention(nn.Module):
    def __init__(self, d, n_head, n_kv_head):
        super().__init__()
        assert d % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv, self.hd = n_head, n_kv_head, d // n_head
        self.q_proj = nn.Linear(d, n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.v_proj = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.o_proj = nn.Linear(n_head * self.hd, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = _rope(q), _rope(k)
        rep = self.n_head // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class _SwiGLU(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _LlamaBlock(nn.Module):
    def __init__(self, d, n_head, n_kv_head, ffn):
        super().__init__()
        self.input_norm, self.post_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = _LlamaAttention(d, n_head, n_kv_head)
        self.mlp = _SwiGLU(d, ffn)

    def forward(self, x):
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_norm(x))


class LlamaLike(nn.Module):
    def __init__(self, vocab, d, n_head, n_kv_head, n_layer, ffn):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_LlamaBlock(d, n_head, n_kv_head, ffn) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama_like(vocab=11, d=8, n_head=2, n_kv_head=1, n_layer=2, T=5, ffn=None, seed=0) -> Case:
    """Llama style LM (RMSNorm, RoPE, GQA, SwiGLU with ffn=2d by default, untied head).
    Batch (idx, targets) (B, T) int64. Loss: CE sum over all tokens."""
    model = _build(seed, lambda: LlamaLike(vocab, d, n_head, n_kv_head, n_layer, ffn or 2 * d))
    return Case("llama_like", model, _token_batch(vocab, T), lambda m, idx, tgt: ce_sum(m(idx), tgt))


# ---- small special-structure models ---------------------------------------------------------------

class _MHAModel(nn.Module):
    def __init__(self, d, n_head, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(d, n_head, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, d)

    def forward(self, x):  # x: (B, T, d) whatever batch_first is
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h if self.batch_first else h.transpose(0, 1))


def mha(d=4, n_head=2, batch_first=True, T=3, seed=0) -> Case:
    """nn.MultiheadAttention self-attention + Linear head; inputs (B, T, d).
    Loss: sum over samples of the per-sample MSE mean ("sum_of_means")."""
    return Case(f"mha{'_bf' if batch_first else '_sf'}", _build(seed, lambda: _MHAModel(d, n_head, batch_first)),
                _regression_batch((T, d), (T, d)), lambda m, x, y: mse_sum_of_means(m(x), y), "sum_of_means")


class _Twice(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f, self.out = nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        return self.out(self.f(torch.tanh(self.f(x))))


def layer_used_twice(d=3, seed=0) -> Case:
    """x -> out(f(tanh(f(x)))): one Linear applied twice. Loss: MSE sum."""
    return Case("layer_used_twice", _build(seed, lambda: _Twice(d)), _regression_batch((d,), (1,)),
                lambda m, x, y: mse_sum(m(x), y))


def frozen_layers(d=3, seed=0) -> Case:
    """3-layer tanh MLP whose first Linear (0.weight, 0.bias) has requires_grad=False. Loss: MSE sum."""
    def build():
        model = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1))
        model[0].requires_grad_(False)
        return model
    return Case("frozen_layers", _build(seed, build), _regression_batch((d,), (1,)),
                lambda m, x, y: mse_sum(m(x), y))


class _Elementwise(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(()))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(torch.tanh(x * self.scale)) + self.bias


def elementwise_params(d=3, T=2, seed=0) -> Case:
    """Per-feature scale (d,) and scalar bias () parameters around a Linear; inputs (B, T, d).
    Loss: sum over samples of the per-sample MSE mean ("sum_of_means")."""
    return Case("elementwise_params", _build(seed, lambda: _Elementwise(d)), _regression_batch((T, d), (T, d)),
                lambda m, x, y: mse_sum_of_means(m(x), y), "sum_of_means")


# ---- Hugging Face transformers --------------------------------------------------------------------

def _hf_loss(m, idx, tgt):
    return ce_sum(m(input_ids=idx, use_cache=False).logits, tgt)


def hf_gpt2(vocab=64, n_embd=16, n_layer=2, n_head=2, T=8, attn_implementation="eager", seed=0) -> Case:
    """transformers GPT2LMHeadModel (Conv1D layers, tied head) from a config, no dropout.
    Loss: CE sum over all tokens computed from .logits (HF's own loss is a token mean)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=T,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, summary_first_dropout=0.0,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                     attn_implementation=attn_implementation)
    return Case(f"hf_gpt2_{attn_implementation}", _build(seed, lambda: GPT2LMHeadModel(cfg)),
                _token_batch(vocab, T), _hf_loss)


def hf_llama(vocab=64, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, T=8,
             attn_implementation="eager", seed=0) -> Case:
    """transformers LlamaForCausalLM (untied head, GQA) from a config, no dropout.
    Loss: CE sum over all tokens computed from .logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=T,
                      attention_dropout=0.0, tie_word_embeddings=False, attn_implementation=attn_implementation)
    return Case(f"hf_llama_{attn_implementation}", _build(seed, lambda: LlamaForCausalLM(cfg)),
                _token_batch(vocab, T), _hf_loss)


# ---- refusal cases: samples interact --------------------------------------------------------------

def batchnorm_model(d=3, seed=0) -> Case:
    """Linear -> BatchNorm1d (train mode: batch statistics mix samples) -> Linear. Loss: MSE sum."""
    model = _build(seed, lambda: nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.Linear(d, 1)))
    return Case("batchnorm", model, _regression_batch((d,), (1,)), lambda m, x, y: mse_sum(m(x), y),
                per_sample=False)


def inbatch_loss_model(d=3, seed=0) -> Case:
    """Linear encoder with an in-batch contrastive loss: CE(z @ z.T, arange(B), sum) mixes samples."""
    def loss_fn(m, x):
        z = m(x)
        return F.cross_entropy(z @ z.T, torch.arange(x.shape[0], device=x.device), reduction="sum")
    return Case("inbatch_contrastive", _build(seed, lambda: nn.Linear(d, d)),
                lambda B, g=None: (torch.randn(B, d, generator=_gen(g)),), loss_fn, per_sample=False)


class _PerHead(nn.Module):
    def __init__(self, h, d, e):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d, e) / math.sqrt(d))
        self.scale = nn.Parameter(torch.randn(h, 1, 1))

    def forward(self, x):  # (B, T, h, d) -> (B, T, h, e)
        return torch.einsum("bthd,hde->bthe", x, self.w) * self.scale.view(1, 1, -1, 1)


def per_head_einsum(h=2, d=3, e=2, T=3, seed=0) -> Case:
    """Per-head weights through einsum: the weight gradient is a bmm that contracts (batch, time): the
    materializing fallback site. Loss: MSE sum."""
    return Case("per_head_einsum", _build(seed, lambda: _PerHead(h, d, e)), _regression_batch((T, h, d), (T, h, e)),
                lambda m, x, y: mse_sum(m(x), y))


def conv_net(dim=2, groups=2, seed=0) -> Case:
    """Conv (padding, groups) -> tanh -> strided conv; inputs (B, 2, 4[, 4]). Loss: MSE sum. The weight and
    bias gradients come out of convolution_backward: the materializing conv site."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    model = _build(seed, lambda: nn.Sequential(conv(2, 4, 3, padding=1, groups=groups), nn.Tanh(),
                                               conv(4, 2, 2, stride=2)))
    return Case(f"conv{dim}d", model, _regression_batch((2,) + (4,) * dim, (2,) + (2,) * dim),
                lambda m, x, y: mse_sum(m(x), y))


# ---- registries -----------------------------------------------------------------------------------

def default_cases(seed: int = 0, hf: bool = True) -> list[Case]:
    """One tiny instance of every per-sample-decomposable model (hf=False skips transformers)."""
    cases = [
        mlp(seed=seed), mlp(input_ndim=3, seed=seed), mlp(input_ndim=4, bias=False, depth=3, seed=seed),
        gpt_like(seed=seed), gpt_like(tied=False, norm="rmsnorm", attn="manual", padding_idx=0, seed=seed),
        llama_like(seed=seed), mha(seed=seed), mha(batch_first=False, seed=seed),
        layer_used_twice(seed=seed), frozen_layers(seed=seed), elementwise_params(seed=seed),
        per_head_einsum(seed=seed), conv_net(seed=seed),
    ]
    if hf:
        cases += [hf_gpt2(seed=seed), hf_llama(seed=seed)]
    return cases


def refusal_cases(seed: int = 0) -> list[Case]:
    """Models whose samples interact; a DP compiler must refuse them."""
    return [batchnorm_model(seed=seed), inbatch_loss_model(seed=seed)]
