"""`dpcompile.compile`: torch.compile with the flashdp backend, one graph for every batch size >= 2."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .options import DPOptions


class DPCompiled:
    """A compiled model that marks the batch dim dynamic before each call, so that Poisson batches of any size
    >= 2 share one graph (sizes 0 and 1 get their own graphs, as Dynamo specializes them)."""

    def __init__(self, model: nn.Module, compiled, options: DPOptions):
        self.module = model
        self._compiled = compiled
        self.options = options

    def _batch_tensor(self, args, kwargs):
        arg = self.options.batch_arg
        if isinstance(arg, str):
            return kwargs.get(arg)
        if isinstance(arg, int):
            return args[arg] if arg < len(args) else None
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                return a
        return None

    def __call__(self, *args, **kwargs):
        x = self._batch_tensor(args, kwargs)
        d = self.options.batch_dim
        if isinstance(x, torch.Tensor) and x.dim() > d and x.shape[d] >= 2:
            # every input with the batch size on the batch dim carries samples (targets, masks): same symbol
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor) and t.dim() > d and t.shape[d] == x.shape[d]:
                    torch._dynamo.mark_dynamic(t, d)
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def compile(model: nn.Module, *, backend: str = "flashdp", fullgraph: bool = True, **options) -> DPCompiled:
    """Compile `model` for DP training. `options` are the flashdp options (max_grad_norm, clipping, clip_fn,
    loss_reduction, batch_arg, batch_dim). fullgraph=True by default: a graph break could let a parameter's
    gradient escape the clipped path."""
    opts = DPOptions.parse(options)
    compiled = torch.compile(model, backend=backend, options=opts.as_dict(), fullgraph=fullgraph)
    return DPCompiled(model, compiled, opts)
