"""The model zoo of the benchmark harness (harness.py): plain PyTorch models shaped like the peers' workloads.

GPT-2-shaped models (token/position embeddings, LayerNorm, fused qkv, SDPA causal attention, an untied 50304-wide
lm_head) and a Llama-style ~1.1B model (RMSNorm, SwiGLU, grouped-query attention, rotary positions, untied lm_head).
`frozen()` lists the parameters the benchmarks freeze (the embeddings). forward(idx, targets) returns the mean over
samples of each sample's token-mean cross-entropy (per-sample separable); logits(idx) the logits.

    from model_zoo import build_model      # with benchmarks/ on sys.path
    model = build_model("gpt2-small", T=1024)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT_SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}
# TinyLlama-1.1B's shape: 22 layers, width 2048, 32 heads, 4 key/value heads, SwiGLU 5632, vocab 32000
LLAMA_1B = dict(n_layer=22, d=2048, n_head=32, n_kv_head=4, ffn=5632, vocab=32000)


def per_sample_mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's token-mean cross-entropy (per-sample separable)."""
    tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return tok.view(targets.shape).mean(1).mean()


class GPTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer, d, h, T, vocab=50304):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(GPTBlock(d, h) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def logits(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))

    def forward(self, idx, targets):
        return per_sample_mean_ce(self.logits(idx), targets)

    def frozen(self):
        return [self.wte.weight, self.wpe.weight]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d, n_head, n_kv_head, ffn):
        super().__init__()
        self.h, self.kv, self.hd = n_head, n_kv_head, d // n_head
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.v = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        h = self.norm1(x)
        q = rotary(self.q(h).view(B, T, self.h, self.hd).transpose(1, 2), cos, sin)
        k = rotary(self.k(h).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        rep = self.h // self.kv  # grouped-query attention: each key/value head serves `rep` query heads
        k = k[:, :, None].expand(B, self.kv, rep, T, self.hd).reshape(B, self.h, T, self.hd)
        v = v[:, :, None].expand(B, self.kv, rep, T, self.hd).reshape(B, self.h, T, self.hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.o(y)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, n_layer, d, n_head, n_kv_head, ffn, vocab, T):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, n_head, n_kv_head, ffn) for _ in range(n_layer))
        self.norm, self.lm_head = nn.RMSNorm(d, eps=1e-5), nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def logits(self, idx):
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.lm_head(self.norm(x))

    def forward(self, idx, targets):
        return per_sample_mean_ce(self.logits(idx), targets)

    def frozen(self):
        return [self.embed.weight]


def build_model(name: str, T: int, tied: bool = False) -> nn.Module:
    """tied: the LM head shares the token embedding's weight (GPT-2's own layout; issue 21 item 3)."""
    if name.startswith("gpt2-"):
        model = GPT(*GPT_SIZES[name.split("-")[1]], T)
        if tied:
            model.lm_head.weight = model.wte.weight
        return model
    if tied:
        raise ValueError(f"tied=True is built for the gpt2 models only, not {name!r}")
    if name == "llama-1b":
        return Llama(**LLAMA_1B, T=T)
    raise ValueError(f"unknown benchmark model {name!r}; known: gpt2-small/medium/large, llama-1b")
