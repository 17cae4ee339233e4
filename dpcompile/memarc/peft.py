"""The usual PEFT baselines (LoRA, bottleneck adapters) and full fine-tuning, as `MemArcLM`s.

Both PEFT methods keep the pretrained function exactly at initialisation: LoRA's B is zero, an adapter's
up-projection (weight and bias) is zero.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import _hf
from .model import MemArcLM, default_std, freeze_all, kaiming_like_linear_


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(x)) around a frozen nn.Linear or Conv1D; A, B bias-free, B = 0 at init."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        d_in, d_out = _hf.linear_dims(base)
        w = base.weight
        self.base = base
        self.lora_A = nn.Linear(d_in, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, d_out, bias=False, device=w.device, dtype=w.dtype)
        kaiming_like_linear_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


class Adapter(nn.Module):
    """x + up(act(down(x))): a bottleneck MLP with a residual; up = 0 at init (identity)."""

    def __init__(self, d: int, bottleneck: int, std: float, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, d, device=device, dtype=dtype)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class AdaptedOutput(nn.Module):
    """A frozen projection followed by an adapter on its output (Houlsby placement: after the attention output
    projection and after the MLP output projection, before each residual add)."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(self.base(x))


class LoRALM(MemArcLM):
    method = "lora"


class AdapterLM(MemArcLM):
    method = "adapters"


class FullLM(MemArcLM):
    method = "full"


def lora(lm: nn.Module, rank: int = 8, alpha: float = 16.0, targets="attn", copy_model: bool = True) -> LoRALM:
    """DP-LoRA: freeze `lm` and put LoRA pairs (A: d_in -> rank, B: rank -> d_out, both bias-free) around the
    projections named by `targets` ("attn" default: every attention projection; "mlp"; "all"; or a list of names
    relative to a decoder layer). Only the A and B matrices train."""
    if rank < 1:
        raise ValueError(f"rank={rank!r} must be >= 1")
    lm = copy.deepcopy(lm) if copy_model else lm
    freeze_all(lm)
    paths = _hf.projection_paths(lm, targets)
    for path in paths:
        _hf.set_submodule(lm, path, LoRALinear(lm.get_submodule(path), rank, alpha))
    return LoRALM(lm, info={"rank": rank, "alpha": alpha, "targets": targets, "sites": len(paths)})


def adapters(lm: nn.Module, bottleneck: int = 64, where=("attn", "mlp"), copy_model: bool = True) -> AdapterLM:
    """Bottleneck adapters (Houlsby et al.) after the attention output projection and/or the MLP output projection
    of every decoder layer (`where`); the backbone is frozen, only the adapters train."""
    if bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r} must be >= 1")
    where = (where,) if isinstance(where, str) else tuple(where)
    if not where or any(w not in ("attn", "mlp") for w in where):
        raise ValueError(f"where={where!r}: a subset of ('attn', 'mlp')")
    lm = copy.deepcopy(lm) if copy_model else lm
    freeze_all(lm)
    fam = _hf.family_of(lm)
    d, std = _hf.hidden_size(lm), default_std(lm)
    prefix = f"{lm.base_model_prefix}.{fam.layers_attr}"
    for i in range(len(_hf.decoder_layers(lm))):
        for w in where:
            path = f"{prefix}.{i}.{fam.attn_out if w == 'attn' else fam.mlp_out}"
            base = lm.get_submodule(path)
            wt = base.weight
            _hf.set_submodule(lm, path, AdaptedOutput(base, Adapter(d, bottleneck, std, wt.device, wt.dtype)))
    return AdapterLM(lm, info={"bottleneck": bottleneck, "where": where})


def full(lm: nn.Module, train_embeddings: bool = False, copy_model: bool = True) -> FullLM:
    """Full fine-tuning (the baseline): every parameter trains except, by default, the token and position
    embeddings (for GPT-2 the token embedding is also the tied LM head, which then stays frozen too)."""
    lm = copy.deepcopy(lm) if copy_model else lm
    for p in lm.parameters():
        p.requires_grad_(True)
    if not train_embeddings:
        base = lm.base_model
        for m in base.modules():
            if isinstance(m, nn.Embedding):
                m.weight.requires_grad_(False)
    return FullLM(lm, info={"train_embeddings": train_embeddings})


@torch.no_grad()
def merge_lora(model: LoRALM) -> nn.Module:
    """The plain HF model with every LoRA pair merged into its base weight (for inference or export)."""
    lm = copy.deepcopy(model.lm)
    for name, m in list(lm.named_modules()):
        if isinstance(m, LoRALinear):
            delta = (m.lora_B.weight @ m.lora_A.weight) * m.scaling  # (out, in)
            base = m.base
            base.weight += delta if isinstance(base, nn.Linear) else delta.t()
            _hf.set_submodule(lm, name, base)
    return lm
