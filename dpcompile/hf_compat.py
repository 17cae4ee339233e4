"""What dpcompile does to a transformers model before it compiles it: every layer runs its PyTorch forward
(`disable_hub_kernels`, which also switches mixture-of-experts layers to the per-token path, `per_token_experts`),
and a call with `labels=` (transformers' own batch-wide loss) is refused before Dynamo runs (`refuse_labels_loss`).

Used by `dpcompile.compile`, by dpcompile.hf (CausalLMLoss, DPTrainer; it re-exports all three, the documented
names are `dpcompile.hf.*`) and by dpcompile.memarc. Imports no transformers: a model is recognised through
`sys.modules`, so these are no-ops where transformers was never imported.
"""
from __future__ import annotations

import inspect
import logging
import sys
import types
from typing import Optional

from torch import nn

from .errors import SampleMixingError

__all__ = ["disable_hub_kernels", "per_token_experts", "refuse_labels_loss"]


def disable_hub_kernels(model: nn.Module) -> nn.Module:
    """Makes every layer of `model` run its PyTorch forward, with no Hugging Face hub kernel; in place, idempotent.

    Called on every transformers model that dpcompile trains (`CausalLMLoss`, hence `DPTrainer` and `dpcompile
    train`, and every `dpcompile.memarc` transformation). Why: transformers >= 5 depends on the `kernels` package
    and uses it in two ways, each of which breaks the compiled DP step:

    - kernelization: `from_pretrained` kernelizes by default (`use_kernels` defaults to True unless the environment
      sets USE_HUB_KERNELS=NO), as do `model.set_use_kernels(True)` and `kernels.kernelize(model, ...)`. The forward
      of RMSNorm, rotary embeddings, activations, ... becomes a hub kernel: an opaque op with no per-sample rule in
      the DP pass. Turned off with transformers' own switch (`model.use_kernels = False`, which runs
      `reset_kernels()`, and keeps `model.train()` from kernelizing again), then by kernelizing with an empty
      mapping, which is how `kernels` reverts a layer that was kernelized without transformers.
    - `@use_kernelized_func`, applied at import to the attention classes of Llama, Mistral, Qwen2, ...: it wraps
      their forward in `kernels`' `new_forward`, which assigns a module-level context variable (the routing of the
      rotary-embedding function) on every call. Dynamo cannot trace that assignment inside a higher-order op, so
      gradient checkpointing (`gradient_checkpointing_enable()`, `dpcompile.memarc.reversible`) fails with
      "HOP: Unsafe side effect". There is no switch for it: each such module gets the function that the wrapper
      wraps (its `__wrapped__`) as its own forward. That is the same computation, with the rotary embedding's
      PyTorch code, which the wrapper also runs once kernelization is off.

    Mixture-of-experts layers are switched to transformers' per-token `batched_mm` experts path the same way
    (`per_token_experts`): the default `grouped_mm` path sorts the whole batch's tokens into an opaque grouped matmul.
    """
    per_token_experts(model)
    kernels = sys.modules.get("kernels")
    if kernels is None:  # transformers imports it when installed, before any layer can be kernelized or wrapped
        return model
    for module in model.modules():
        if getattr(module, "use_kernels", False) is True and hasattr(module, "reset_kernels"):
            module.use_kernels = False  # transformers' switch (PreTrainedModel.use_kernels setter)
    kernels_log = logging.getLogger("kernels._internals.layer.layer")
    level = kernels_log.level
    kernels_log.setLevel(logging.ERROR)  # one "No kernel mapping found" warning per layer otherwise
    try:
        with kernels.use_kernel_mapping({}, inherit_mapping=False):  # no layer has a kernel: each gets its own
            # (the device only selects among a layer's kernels, of which there are none here)
            kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu", use_fallback=True)
    finally:
        kernels_log.setLevel(level)
    for module in model.modules():
        forward = type(module).forward
        wrapped = getattr(forward, "__wrapped__", None)
        from_kernels = getattr(forward, "__globals__", {}).get("__name__", "").startswith("kernels.")
        if wrapped is not None and from_kernels and "forward" not in module.__dict__:
            module.forward = types.MethodType(wrapped, module)
    return model


def per_token_experts(model: nn.Module) -> nn.Module:
    """Mixture-of-experts layers of `model` run transformers' `batched_mm` experts path; in place, idempotent.

    transformers' default `grouped_mm` path (`integrations/moe.py`) sorts the (token, expert) pairs of the whole
    batch by expert id and runs each expert's rows through one grouped matmul (an opaque custom op on CPU, whose
    weight gradient is a sum over every row of the group): which sample a row belongs to is lost in the sort, so the
    DP pass refuses it (`SampleMixingError` at `sort`). `batched_mm` is the same computation per (token, expert)
    pair: each pair gathers its expert's weights (`gate_up_proj[expert_ids]`), one batched matmul, and the pairs
    are summed back per token by a reshape; each expert weight's gradient is then a scatter-add of per-token
    products by expert id, which the pass clips per sample like an embedding table's. It costs memory: the gathered
    weights are (tokens x top_k) x expert size, fine for small MoE models and short sequences. Called by
    `disable_hub_kernels`, hence for every transformers model dpcompile trains; `eager`, `deepgemm` and `sonicmoe`
    (a data-dependent loop over experts, GPU kernels) are switched too."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None or not any(hasattr(m, "_is_expert_parallel") for m in model.modules()):
        return model  # no experts layer built with transformers' use_experts_implementation
    for m in model.modules():
        if isinstance(m, modeling_utils.PreTrainedModel) and \
                getattr(m.config, "_experts_implementation", None) != "batched_mm":
            m.set_experts_implementation("batched_mm")  # recurses into sub-models with other configs
    return model


_LABELS_POSITION: dict[type, Optional[int]] = {}


def _labels_position(cls: type) -> Optional[int]:
    """Position of `labels` among the positional arguments of `cls.forward` (self excluded), None if it has none."""
    if cls not in _LABELS_POSITION:
        try:
            names = list(inspect.signature(cls.forward).parameters)[1:]
        except (TypeError, ValueError):
            names = []
        _LABELS_POSITION[cls] = names.index("labels") if "labels" in names else None
    return _LABELS_POSITION[cls]


def refuse_labels_loss(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raises `SampleMixingError` when `module` is a transformers model called with labels (its own loss).

    Meant for `DPCompiled.__call__`, before Dynamo runs: a transformers model given `labels` computes its loss
    inside its forward as a token mean over the whole batch (`ignore_index` tokens left out): a batch-wide
    normaliser, with no per-sample gradient, that the pass would refuse too. Dynamo does not get that far: it stops
    first on transformers' logging in the loss code (`Unsupported: logging.Logger method`), an error that says
    nothing about the cause. Cheap: a module that is not a transformers model returns at once.
    """
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None or not isinstance(module, modeling_utils.PreTrainedModel):
        return
    pos = _labels_position(type(module))
    labels = kwargs.get("labels")
    if labels is None and pos is not None and pos < len(args):
        labels = args[pos]
    if labels is None:
        return
    name = type(module).__name__
    raise SampleMixingError(
        f"{name} called with labels= computes transformers' own loss, a token mean over the whole batch (each "
        f"sample weighted by its token count relative to the other samples'): a batch-wide normaliser, so no "
        f"per-sample gradient exists. Compile a per-sample loss instead: for a causal LM, "
        f"dpcompile.compile(dpcompile.hf.CausalLMLoss(model), ...) called as (input_ids, attention_mask, "
        f"labels=labels); for another head, a module that computes each sample's loss from {name}'s logits and "
        f"returns their mean or sum (see docs/huggingface.md)")
