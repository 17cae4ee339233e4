"""DP-MemArc_side: ladder side tuning (LST, Sung et al. 2022) of a frozen causal LM.

    h_0, h_1, ..., h_L = the backbone's hidden states (embedding output, then every decoder layer's output),
                         computed under torch.no_grad(): the backbone runs forward only and keeps nothing for
                         backward
    s = down_0(h_0)                                   ladder: Linear(d, d/r) per tap
    for every tapped layer l (in order):
        s = mu_l * s + (1 - mu_l) * down_l(h_l)       mu_l = sigmoid(alpha_l / 0.1), alpha_l = 0 at init (LST's gate)
        s = side_block_l(s)                           pre-norm transformer block of width d/r (causal attention, MLP)
    logits = lm_head(final_hidden + up(norm(s)))      up: Linear(d/r, d), zero at init

`final_hidden` is the backbone's last hidden state after its final norm, so the side network's output is added in
the space the (frozen) LM head reads, through `up`, which is zero at initialisation: the model computes exactly the
pretrained function at initialisation. (LST feeds the upsampled side output to the head of the backbone; adding it
to the backbone's normalised output through a zero-initialised projection is our choice, so that training starts at
the pretrained model.) LST initialises the side blocks from a pruned copy of the backbone; we initialise them at
random (std = the model's initializer_range) — only `up` has to be zero for the starting point.

What backward keeps: the taps h_l (inputs of the trainable ladders, B*T*d each), the side network's own
activations (width d/r) and the LM head's weight. Nothing else of the backbone.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _hf
from ..errors import DPCompileError
from .model import MemArcLM, default_std, freeze_all

GATE_TEMPERATURE = 0.1


class _Tap(nn.Module):
    """Wraps a decoder layer; records the layer's input (layer 0 only) and output in `store` during a forward."""

    def __init__(self, layer: nn.Module, store: list, record_input: bool):
        super().__init__()
        self.layer = layer
        self.store = store
        self.record_input = record_input

    def forward(self, hidden_states, *args, **kwargs):
        if self.record_input:
            self.store.append(hidden_states)
        out = self.layer(hidden_states, *args, **kwargs)
        self.store.append(out[0] if isinstance(out, tuple) else out)
        return out


def _norm(kind: str, d: int, eps: float, device, dtype) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)


class SideBlock(nn.Module):
    """Pre-norm transformer block at the side width: causal SDPA attention (fused qkv) and a GELU MLP."""

    def __init__(self, d: int, n_head: int, norm: str, eps: float, std: float, device=None, dtype=None):
        super().__init__()
        if d % n_head:
            raise DPCompileError(f"dpcompile.memarc.side: side width {d} is not divisible by {n_head} heads")
        self.n_head = n_head
        kw = dict(device=device, dtype=dtype)
        self.norm1, self.norm2 = _norm(norm, d, eps, **kw), _norm(norm, d, eps, **kw)
        self.qkv = nn.Linear(d, 3 * d, **kw)
        self.proj = nn.Linear(d, d, **kw)
        self.fc = nn.Linear(d, 4 * d, **kw)
        self.fc2 = nn.Linear(4 * d, d, **kw)
        for lin in (self.qkv, self.proj, self.fc, self.fc2):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.norm2(x))))


class Ladder(nn.Module):
    """One ladder rung: the down-projection (weight, bias) of a tapped hidden state and its LST gate alpha (a
    scalar, 0 at init). All three belong to this module, so per-layer clipping makes one group of them."""

    def __init__(self, d: int, d_side: int, std: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_side, d, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_side, device=device, dtype=dtype))
        self.alpha = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=std)

    def forward(self, s, h):
        mu = torch.sigmoid(self.alpha / GATE_TEMPERATURE)
        return mu * s + (1 - mu) * F.linear(h, self.weight, self.bias)


class SideNetwork(nn.Module):
    def __init__(self, d: int, d_side: int, n_taps: int, n_head: int, norm: str, eps: float, std: float,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.down0 = nn.Linear(d, d_side, **kw)
        self.ladders = nn.ModuleList(Ladder(d, d_side, std, **kw) for _ in range(n_taps))
        self.blocks = nn.ModuleList(SideBlock(d_side, n_head, norm, eps, std, **kw) for _ in range(n_taps))
        self.norm = _norm(norm, d_side, eps, **kw)
        self.up = nn.Linear(d_side, d, **kw)
        nn.init.normal_(self.down0.weight, std=std)
        nn.init.zeros_(self.down0.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h0: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        s = self.down0(h0)
        for h, ladder, block in zip(taps, self.ladders, self.blocks):
            s = block(ladder(s, h))
        return self.up(self.norm(s))


class SideLM(MemArcLM):
    method = "side"

    def __init__(self, lm, side: SideNetwork, tap_layers: list[int], store: list, info: dict):
        super().__init__(lm, info=info)
        self._store = store  # plain attribute: the taps recorded by the _Tap wrappers during one forward
        self.side = side
        self.tap_layers = tap_layers
        self._declared = sorted(n for n, p in self.named_parameters() if p.requires_grad)

    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._store.clear()
        with torch.no_grad():  # forward only: no backbone activation is kept for backward
            final = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        states = list(self._store)  # h_0 (embedding output), h_1 .. h_L (layer outputs)
        self._store.clear()
        taps = [states[l] for l in self.tap_layers]
        h = final + self.side(states[0], taps)
        return self.lm.get_output_embeddings()(h)

    def clipping_cost(self, clipping):
        if clipping == "flat":
            return ("clipping='flat' keeps every side-network site's operands until the backward has reached the "
                    "first ladder; the side network is narrow (width d/r), so this adds about B*T*d/r values per "
                    "site, and the ladders' inputs (the taps) are kept anyway")
        return None


def side_network(lm: nn.Module, reduction: int = 8, ladder_layers: Union[str, int, Sequence[int]] = "all",
                 n_head: Optional[int] = None, copy_model: bool = True) -> SideLM:
    """DP-MemArc_side: freeze `lm` and attach a ladder side network of width d / `reduction`.

    ladder_layers: which decoder layers' outputs feed the ladder: "all" (default, as LST), an int k (every k-th
        layer, always including the last), or a list of layer indices in 1..L (layer l's output; 0 is the
        embedding output, which always initialises the side state). One side block per tapped layer.
    n_head: side attention heads (default: the largest divisor of the side width that is <= max(1, width // 64)).
    """
    fam = _hf.family_of(lm)
    d = _hf.hidden_size(lm)
    if reduction < 1 or d % reduction:
        raise DPCompileError(f"dpcompile.memarc.side: reduction={reduction!r} must divide the hidden size {d}")
    d_side = d // reduction
    L = len(_hf.decoder_layers(lm))
    if ladder_layers == "all":
        taps = list(range(1, L + 1))
    elif isinstance(ladder_layers, int):
        if ladder_layers < 1:
            raise DPCompileError(f"dpcompile.memarc.side: ladder_layers={ladder_layers!r} must be >= 1")
        taps = sorted(set(range(ladder_layers, L + 1, ladder_layers)) | {L})
    else:
        taps = sorted(set(int(t) for t in ladder_layers))
        if not taps or taps[0] < 1 or taps[-1] > L:
            raise DPCompileError(f"dpcompile.memarc.side: ladder_layers={ladder_layers!r} must name layers in 1..{L}")
    if n_head is None:
        n_head = max(h for h in range(1, max(1, d_side // 64) + 1) if d_side % h == 0)
    lm = copy.deepcopy(lm) if copy_model else lm
    freeze_all(lm)
    store: list = []
    layers = _hf.decoder_layers(lm)
    for i in range(L):
        layers[i] = _Tap(layers[i], store, record_input=(i == 0))
    eps = float(getattr(lm.config, "layer_norm_epsilon", None) or getattr(lm.config, "rms_norm_eps", None) or 1e-5)
    w = next(lm.parameters())
    side = SideNetwork(d, d_side, len(taps), n_head, fam.norm, eps, default_std(lm), w.device, w.dtype)
    info = {"reduction": reduction, "width": d_side, "taps": taps, "heads": n_head, "family": fam.name}
    return SideLM(lm, side, taps, store, info)
