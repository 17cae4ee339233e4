"""DP-MemArc_rev: reversible adapter couplings after every frozen decoder layer, activations recomputed in backward.

Layer n of the transformed model computes

    u = B_n(h_n)                           the frozen pretrained decoder layer (residuals included)
    (u_a, u_b) = split(u)                  the two halves of the hidden features
    v_a = u_a + F_n(u_b)                   F_n, G_n: bottleneck MLPs  d/2 -> r -> d/2  (GELU), trainable
    v_b = u_b + G_n(v_a)
    h_{n+1} = cat(v_a, v_b)

F_n and G_n have zero up-projections at initialisation, so each coupling is the identity and the model computes
exactly the pretrained function. The coupling is an additive (RevNet) coupling: exactly invertible, and its inverse
u_b = v_b - G_n(v_a), u_a = v_a - F_n(u_b) amplifies nothing (no division by a small scale).

Memory (what the backward keeps):
- The coupling is a `torch.autograd.Function` that saves only its output h_{n+1}; its backward rebuilds u_b from
  h_{n+1} with the inverse and recomputes F_n's and G_n's hidden activations, then forms every gradient by hand
  (plain mm / sums, which the flashdp pass privatizes as linear sites).
- With `recompute_backbone=True` (default) the frozen layer B_n runs under activation checkpointing: its internal
  activations are recomputed in backward from its input h_n, which is the previous coupling's output (kept once).
  So the backward keeps one hidden state per layer boundary and nothing else of the backbone.

Why not a fully reversible backbone (MEFT): the pretrained layer h -> h + f(h) is not invertible in closed form, so
any reversible network that contains it (two streams, h_n^1 = lam * h_{n-1}^1 + F(h_{n-1}^2), ...) computes the
pretrained function only in the limit lam -> 0, where its inverse divides by lam at every layer (errors grow like
lam^-L). An exact starting point forces keeping the information that B_n discards, i.e. the layer boundaries, which
is what this design keeps (B*T*d values per layer; for gpt2-large at B=8, T=1024 in fp32 about 1.5 GB in all).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _hf
from ..errors import DPCompileError
from .model import MemArcLM, default_std, freeze_all

aten = torch.ops.aten


def _mlp(z, dw, db, uw, ub):
    pre = F.linear(z, dw, db)
    a = F.gelu(pre)
    return F.linear(a, uw, ub), pre, a


def _mlp_backward(go, z, pre, a, dw, uw):
    """Gradients of out = up(gelu(down(z))) given d(loss)/d(out) = go: (gz, g_dw, g_db, g_uw, g_ub)."""
    g2 = go.reshape(-1, go.shape[-1])
    g_uw = g2.t().mm(a.reshape(-1, a.shape[-1]))
    g_ub = g2.sum(0)
    gpre = aten.gelu_backward(go.matmul(uw), pre)
    gp2 = gpre.reshape(-1, gpre.shape[-1])
    g_dw = gp2.t().mm(z.reshape(-1, z.shape[-1]))
    g_db = gp2.sum(0)
    return gpre.matmul(dw), g_dw, g_db, g_uw, g_ub


def coupling_forward(x, d1, fdw, fdb, fuw, fub, gdw, gdb, guw, gub):
    xa, xb = x[..., :d1], x[..., d1:]
    ya = xa + _mlp(xb, fdw, fdb, fuw, fub)[0]
    yb = xb + _mlp(ya, gdw, gdb, guw, gub)[0]
    return torch.cat([ya, yb], -1)


def coupling_inverse(y, d1, fdw, fdb, fuw, fub, gdw, gdb, guw, gub):
    ya, yb = y[..., :d1], y[..., d1:]
    xb = yb - _mlp(ya, gdw, gdb, guw, gub)[0]
    xa = ya - _mlp(xb, fdw, fdb, fuw, fub)[0]
    return torch.cat([xa, xb], -1)


class _RevCouplingFn(torch.autograd.Function):
    """y = coupling(x); saves y only and rebuilds what the backward needs from it."""

    @staticmethod
    def forward(ctx, x, d1, fdw, fdb, fuw, fub, gdw, gdb, guw, gub):
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = coupling_forward(x, d1, fdw, fdb, fuw, fub, gdw, gdb, guw, gub)
        ctx.d1 = d1
        ctx.save_for_backward(y, fdw, fdb, fuw, fub, gdw, gdb, guw, gub)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, fdw, fdb, fuw, fub, gdw, gdb, guw, gub = ctx.saved_tensors
        d1 = ctx.d1
        with torch.autocast(device_type=y.device.type, enabled=False):
            gy = gy.to(y.dtype)
            ya, yb = y[..., :d1], y[..., d1:]
            gya, gyb = gy[..., :d1], gy[..., d1:]
            # yb = xb + G(ya): recompute G's activations from ya, rebuild xb
            g_out, g_pre, g_act = _mlp(ya, gdw, gdb, guw, gub)
            xb = yb - g_out
            gya_g, g_gdw, g_gdb, g_guw, g_gub = _mlp_backward(gyb, ya, g_pre, g_act, gdw, guw)
            gya = gya + gya_g
            # ya = xa + F(xb): recompute F's activations from the rebuilt xb
            _, f_pre, f_act = _mlp(xb, fdw, fdb, fuw, fub)
            gxb_f, g_fdw, g_fdb, g_fuw, g_fub = _mlp_backward(gya, xb, f_pre, f_act, fdw, fuw)
            gx = torch.cat([gya, gyb + gxb_f], -1)
        return gx, None, g_fdw, g_fdb, g_fuw, g_fub, g_gdw, g_gdb, g_guw, g_gub


class Bottleneck(nn.Module):
    """down: d_in -> r (normal init), up: r -> d_out (zero init); used through the coupling's functions."""

    def __init__(self, d_in: int, r: int, d_out: int, std: float, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d_in, r, device=device, dtype=dtype)
        self.up = nn.Linear(r, d_out, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def params(self):
        return self.down.weight, self.down.bias, self.up.weight, self.up.bias


class RevCoupling(nn.Module):
    """The additive coupling (v_a = u_a + F(u_b), v_b = u_b + G(v_a)) over the two halves of the features."""

    def __init__(self, d: int, bottleneck: int, std: float, device=None, dtype=None):
        super().__init__()
        if d < 2:
            raise DPCompileError(f"dpcompile.memarc.reversible: hidden size {d} cannot be split in two halves")
        self.d1 = d // 2
        self.F = Bottleneck(d - self.d1, bottleneck, self.d1, std, device, dtype)
        self.G = Bottleneck(self.d1, bottleneck, d - self.d1, std, device, dtype)
        #: False: plain autograd through the same ops (stores the activations; the reference for tests)
        self.memory_efficient = True

    def forward(self, x):
        params = self.F.params() + self.G.params()
        if self.memory_efficient and torch.is_grad_enabled():
            return _RevCouplingFn.apply(x, self.d1, *params)
        return coupling_forward(x, self.d1, *params)

    def inverse(self, y):
        return coupling_inverse(y, self.d1, *(self.F.params() + self.G.params()))


class RevLayer(nn.Module):
    """A frozen decoder layer (checkpointed if `recompute`) followed by a reversible coupling."""

    def __init__(self, block: nn.Module, coupling: RevCoupling, recompute: bool):
        super().__init__()
        self.block = block
        self.coupling = coupling
        self.recompute = recompute

    def forward(self, hidden_states, *args, **kwargs):
        if self.recompute and self.coupling.memory_efficient and torch.is_grad_enabled():
            out = checkpoint(self.block, hidden_states, *args, use_reentrant=False, **kwargs)
        else:
            out = self.block(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.coupling(out[0]),) + tuple(out[1:])
        return self.coupling(out)


class ReversibleLM(MemArcLM):
    method = "reversible"

    def couplings(self) -> list[RevCoupling]:
        return [m for m in self.modules() if isinstance(m, RevCoupling)]

    def set_memory_efficient(self, on: bool) -> "ReversibleLM":
        """off: the same function through plain autograd, no recomputation (a reference for tests)."""
        for c in self.couplings():
            c.memory_efficient = on
        return self

    def clipping_cost(self, clipping):
        if clipping == "flat":
            return ("clipping='flat' keeps, until the backward reaches the first layer, the operands of every "
                    "coupling's clipped sums (the rebuilt half state, the bottleneck activations and their output "
                    "gradients: about B*T*(d + 2r) values per layer), which the per-layer style frees layer by "
                    "layer; with flat clipping, recomputation saves the backbone's activations but no longer the "
                    "couplings'. Avoiding that would take a second reversible backward (norms first, then clipped "
                    "sums), which dpcompile does not do")
        return None

    def check_clipping(self, clipping, accept_flat_cost: bool = False) -> None:
        super().check_clipping(clipping)
        if clipping == "flat" and not accept_flat_cost:
            raise DPCompileError(
                "dpcompile.memarc.reversible: refusing option clipping='flat' by default: " + self.clipping_cost("flat")
                + ". Use clipping='per_layer' (or 'per_param'), or pass accept_flat_cost=True to accept the memory")


def reversible(lm: nn.Module, bottleneck: int = 64, recompute_backbone: bool = True,
               copy_model: bool = True) -> ReversibleLM:
    """DP-MemArc_rev: freeze `lm` and follow every decoder layer with a reversible adapter coupling (identity at
    initialisation) whose activations are rebuilt from its output in backward; with `recompute_backbone` the frozen
    layers are recomputed from the layer boundaries too (see the module docstring)."""
    if bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r} must be >= 1")
    lm = copy.deepcopy(lm) if copy_model else lm
    freeze_all(lm)
    fam = _hf.family_of(lm)
    d, std = _hf.hidden_size(lm), default_std(lm)
    layers = _hf.decoder_layers(lm)
    w = next(lm.parameters())
    for i in range(len(layers)):
        layers[i] = RevLayer(layers[i], RevCoupling(d, bottleneck, std, w.device, w.dtype), recompute_backbone)
    return ReversibleLM(lm, info={"bottleneck": bottleneck, "recompute_backbone": recompute_backbone,
                                  "family": fam.name})
