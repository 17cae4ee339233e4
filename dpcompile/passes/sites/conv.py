"""conv: the weight / bias outputs of convolution_backward (materialized: the batch folded into the groups)."""
from __future__ import annotations

import operator

import torch

from ...errors import UnsupportedGradientError
from ..batchdim import node_location
from ..patterns import Site
from . import SiteKind, register_site_kind


def matches(node) -> bool:
    return node.target is operator.getitem and \
        getattr(node.args[0], "target", None) is torch.ops.aten.convolution_backward.default


def classify(node, st, state, name) -> Site:
    conv = node.args[0]
    grad, x, w = conv.args[:3]
    stride, padding, dilation, transposed, output_padding, groups = conv.args[4:10]
    if transposed:
        raise UnsupportedGradientError(
            f"gradient of `{name}` comes from a transposed convolution at `{conv.name}`{node_location(conv)}, "
            "which dpcompile cannot compute per sample yet")
    which = {1: "weight", 2: "bias"}.get(node.args[1])
    if which is None:
        raise UnsupportedGradientError(f"gradient of `{name}` is the input gradient of `{conv.name}`")
    return Site("conv", node, {"grad": grad, "x": x, "w": w}, {},
                {"which": which, "stride": stride, "padding": padding, "dilation": dilation,
                 "output_padding": output_padding, "groups": groups})


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    """Per-sample convolution parameter gradients, (B, *shape): the batch folded into the channel groups."""
    g, x, w = (env[site.operands[k]] for k in ("grad", "x", "w"))
    if site.info["which"] == "bias":
        return g.sum(list(range(2, g.dim())))
    i = site.info
    x1 = x.reshape(1, -1, *x.shape[2:])  # (1, B*Cin, *S)
    g1 = g.reshape(1, -1, *g.shape[2:])  # (1, B*Cout, *S')
    w1 = w.repeat(bsz, *([1] * (w.dim() - 1)))  # (B*Cout, Cin/G, *k)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g1, x1, w1, None, i["stride"], i["padding"], i["dilation"], False, i["output_padding"],
        i["groups"] * bsz, [False, True, False])
    return gw.reshape(bsz, *w.shape)


KIND = register_site_kind(SiteKind("conv", classify, per_sample, matches=matches), replace=True)
