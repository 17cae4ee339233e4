"""Before training: what the flashdp pass will refuse that the module tree already shows, and a fix for it.

    problems = dpcompile.validate(model)      # [] when nothing is seen; each problem names the module and the fix
    model = dpcompile.fix(model)              # BatchNorm / GroupNorm -> dpcompile's GroupNorm, parameters kept

The pass itself remains the judge (it sees the graph: ops that mix samples, losses, graph breaks); these checks
only see module types and attributes, so that a problem is reported before a compile, with its module path.
`ModuleValidator` offers the same as Opacus's class of that name (validate(model, strict=False), fix(model),
is_valid(model)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List

import torch
from torch import nn

from ..errors import DPCompileError

__all__ = ["ModuleProblem", "validate", "fix", "GroupNorm", "ModuleValidator"]


@dataclasses.dataclass(frozen=True)
class ModuleProblem:
    """One thing the pass will refuse: `path` (the module's name in named_modules(), "" for the root), `kind`
    ("batch_norm", "group_norm", "not_a_parameter", "sample_mixing_loss", "unsupported_gradient", "pooling",
    "data_parallel_wrapper"), a message that names the fix, and whether `fix()` fixes it."""
    path: str
    kind: str
    message: str
    fixable: bool = False

    def __str__(self) -> str:
        return self.message


def _where(path: str) -> str:
    return f"`{path}`" if path else "the root module"


def _trainable_non_parameters(path: str, module: nn.Module):
    """Tensors of `module` that require grad but are no nn.Parameter: attributes and buffers."""
    for name, value in vars(module).items():
        if name.startswith("_") and name in ("_parameters", "_buffers", "_modules"):
            continue
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.requires_grad:
            yield name, "attribute"
    for name, buf in module._buffers.items():
        if buf is not None and buf.requires_grad:
            yield name, "buffer"


_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)


def _is_refused_pool(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
        size = module.output_size
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        return any(s is not None and s != 1 for s in sizes)
    return isinstance(module, _POOLS)


def validate(model: nn.Module, strict: bool = False) -> List[ModuleProblem]:
    """What the flashdp pass will refuse in `model`, as far as module types and attributes show it:

    - BatchNorm (any `_BatchNorm`, SyncBatchNorm too) in training mode, or without running statistics: it
      normalises by batch statistics, which mixes samples. fix() replaces it.
    - torch's GroupNorm: per-sample, but its fused op is refused by the pass's batch-dim analysis in this
      version. fix() replaces it by dpcompile's GroupNorm (the same function, written with views and reductions).
    - a tensor that requires grad but is not an nn.Parameter (an attribute or a buffer): its gradient would not
      be clipped. Register it as a parameter, or set requires_grad=False.
    - a CrossEntropyLoss / NLLLoss module with class weights and reduction "mean": it divides by the batch's
      total weight, which mixes samples. Use reduction="sum" divided by the batch size.
    - nn.Embedding / EmbeddingBag with scale_grad_by_freq=True (the gradient depends on the whole batch's counts),
      transposed convolutions (their gradient is refused), and DataParallel / DistributedDataParallel wrappers
      (give dpcompile the bare module; make_private trains data-parallel itself).
    - pooling layers (MaxPool, AvgPool, LPPool, adaptive pools to more than one value) after a trainable layer:
      the pass's batch-dim analysis does not follow their ops in this version, so the gradients of the layers
      before them are refused. Strided convolutions, or AdaptiveAvgPool to size 1 (a mean), go through.

    Returns the list (empty: nothing seen); strict=True raises DPCompileError listing them instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"validate expects an nn.Module, got {type(model).__name__}")
    problems: List[ModuleProblem] = []
    trainable_before = False  # a trainable parameter registered earlier (module order stands for data flow)
    for path, module in model.named_modules():
        where = _where(path)
        kind = type(module).__name__
        if trainable_before and _is_refused_pool(module):
            problems.append(ModuleProblem(path, "pooling", (
                f"{where} ({kind}): the pass's batch-dim analysis does not follow pooling ops in this version, so "
                "the gradients of the trainable layers before it are refused. Use a strided convolution, or "
                "AdaptiveAvgPool to output size 1 (a mean), which go through")))
        trainable_before = trainable_before or any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or not module.track_running_stats:
                why = "in training mode" if module.training else "without running statistics"
                problems.append(ModuleProblem(path, "batch_norm", (
                    f"{where} ({kind}) normalises by the statistics of the batch {why}, which mixes samples: the "
                    "pass refuses it. dpcompile.fix(model) replaces it by a GroupNorm "
                    "(gcd(32, num_features) groups, its affine parameters kept)"), fixable=True))
        elif type(module) is nn.GroupNorm:
            problems.append(ModuleProblem(path, "group_norm", (
                f"{where} (torch.nn.GroupNorm) is per-sample, but its fused op is refused by the pass's batch-dim "
                "analysis in this version. dpcompile.fix(model) replaces it by dpcompile's GroupNorm (the same "
                "function in views and reductions, the same parameters)"), fixable=True))
        elif isinstance(module, (nn.CrossEntropyLoss, nn.NLLLoss)):
            if module.reduction == "mean" and getattr(module, "weight", None) is not None:
                problems.append(ModuleProblem(path, "sample_mixing_loss", (
                    f"{where} ({kind}, class weights, reduction='mean') divides by the total weight of the batch's "
                    "targets, which mixes samples. Use reduction='sum' and divide by the batch size")))
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            if module.scale_grad_by_freq and module.weight.requires_grad:
                problems.append(ModuleProblem(path, "unsupported_gradient", (
                    f"{where} ({kind}) has scale_grad_by_freq=True: its gradient is scaled by counts over the whole "
                    "batch, which mixes samples. Set scale_grad_by_freq=False")))
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                problems.append(ModuleProblem(path, "unsupported_gradient", (
                    f"{where} ({kind}): the pass does not privatize the gradients of transposed convolutions. "
                    "Freeze its parameters (requires_grad=False) or replace it (an upsampling then a Conv)")))
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            problems.append(ModuleProblem(path, "data_parallel_wrapper", (
                f"{where} ({kind}): give dpcompile the bare module; make_private trains data-parallel by itself "
                "under torchrun (docs/distributed.md)")))
        for name, what in _trainable_non_parameters(path, module):
            full = f"{path}.{name}" if path else name
            problems.append(ModuleProblem(full, "not_a_parameter", (
                f"`{full}` is a {what} of {where} that requires grad but is not an nn.Parameter, so its gradient "
                "would not be clipped. Register it as a parameter (nn.Parameter) or set requires_grad=False")))
    if strict and problems:
        raise DPCompileError("the model has modules the flashdp pass refuses:\n" +
                             "\n".join(f"  - {p}" for p in problems))
    return problems


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm computed with a view and per-sample reductions (mean and biased variance over each
    group), which the flashdp pass follows sample by sample; the same parameters, state_dict and results (to
    float rounding) as nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(shape[0], self.num_groups, -1)
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.affine:
            view = (1, self.num_channels) + (1,) * (x.dim() - 2)
            h = h * self.weight.reshape(view) + self.bias.reshape(view)
        return h


def _group_norm_like(old: nn.Module, num_groups: int, num_channels: int, eps: float, affine: bool) -> GroupNorm:
    new = GroupNorm(num_groups, num_channels, eps=eps, affine=False)
    if affine:  # the same Parameter objects: an optimizer built before fix() still trains them
        new.affine = True
        new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    return new


def _replacement(module: nn.Module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise DPCompileError("fix: a lazy BatchNorm with uninitialized parameters cannot be replaced yet; run one "
                                 "forward first (or use BatchNorm with num_features)")
        c = module.num_features
        return _group_norm_like(module, math.gcd(32, c), c, module.eps, module.affine)
    if type(module) is nn.GroupNorm:
        return _group_norm_like(module, module.num_groups, module.num_channels, module.eps, module.affine)
    return None


def fix(model: nn.Module) -> nn.Module:
    """Replace, in place, every module that validate() reports as fixable: BatchNorm{1,2,3}d (and SyncBatchNorm)
    in training mode by a GroupNorm with gcd(32, num_features) groups (as Opacus chooses), and torch's GroupNorm by
    dpcompile's, keeping eps and the affine parameters themselves (the same nn.Parameter objects, so an optimizer
    built before still trains them; BatchNorm's running statistics are dropped: GroupNorm has none). Returns the
    model (a new module only when the root itself is replaced). The other problems are left for validate() to
    report: they have no automatic fix."""
    root = _replacement(model)
    if root is not None:
        return root
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(module, name, new)
    return model


class ModuleValidator:
    """Opacus's ModuleValidator, for ported scripts: validate(model, strict=False) -> list of problems,
    fix(model) -> model, is_valid(model) -> bool."""

    @staticmethod
    def validate(model: nn.Module, strict: bool = False) -> List[ModuleProblem]:
        return validate(model, strict=strict)

    @staticmethod
    def fix(model: nn.Module, **_) -> nn.Module:
        return fix(model)

    @staticmethod
    def is_valid(model: nn.Module) -> bool:
        return not validate(model)
