"""The per-sample losses of `dpcompile.hf` (which re-exports everything here: import from there). CausalLMLoss and
per_sample_lm_loss for causal LMs; SequenceClassificationLoss and per_sample_classification_loss for the sequence
classifiers of the GPT-2 and Llama families; the head that picks one (model_head, loss_module); the 4-D masks and the
last-token pooling that keep samples apart; the collate functions that pad batches for them. See dpcompile/hf.py's
docstring for what they compute and why.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hf_compat import disable_hub_kernels

IGNORE_INDEX = -100


def causal_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32,
                   attn_implementation: Optional[str] = "sdpa") -> torch.Tensor:
    """(B, 1, T, T) attention mask from a (B, T) padding mask: query t sees key s <= t when s is a real token.

    Built with broadcasting only, so it stays per-sample (transformers' own mask builder indexes the padding mask
    with arange(B), which dpcompile's batch analysis treats as mixing samples). A padding query also sees itself,
    so no softmax row is empty (no NaN under left padding); real queries are unaffected. "eager" attention adds the
    mask to the scores, so it gets a float mask (0 or the dtype's minimum); every other implementation a bool one.
    """
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device)
    causal = pos[None, :] <= pos[:, None]                                    # (T_q, T_k)
    key_ok = attention_mask[:, None, None, :].bool()                         # (B, 1, 1, T_k)
    mask = causal[None, None] & (key_ok | torch.eye(T, dtype=torch.bool, device=attention_mask.device))
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cross-entropy is taken in float32 at least (half-precision logits lose the loss's small differences)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                       shift: bool = True, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) per-sample losses: the mean next-token cross-entropy over each sample's own non-ignored targets.

    logits: (B, T, V); labels: (B, T) with `ignore_index` where there is no target. shift=True predicts
    labels[:, t+1] from logits[:, t] (transformers' convention: labels are the input ids). attention_mask (B, T):
    a target counts only where it and the position predicting it are real tokens (so the first real token after
    left padding is not predicted from a padding position). A sample with no target at all has loss 0 (and so a
    zero gradient), never NaN. The cross-entropy is taken in the logits' dtype, float32 at least.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, :-1] == 0, ignore_index)
    tok = F.cross_entropy(logits.flatten(0, 1).to(_loss_dtype(logits.dtype)), labels.flatten(),
                          ignore_index=ignore_index, reduction="none").view(labels.shape)
    count = (labels != ignore_index).sum(1).clamp(min=1)
    return tok.sum(1) / count


class CausalLMLoss(nn.Module):
    """`forward(input_ids, attention_mask=None, labels=None) -> loss`: a per-sample separable causal-LM loss.

    model: a transformers causal LM (anything returning `.logits` of shape (B, T, V) for `input_ids`). Its hub
        kernels are turned off, in place (`disable_hub_kernels`).
    reduction: "mean" (default) or "sum" over samples of the per-sample token means; pass the same value as
        `loss_reduction` to dpcompile.
    labels: default `input_ids`; targets at padding (attention_mask == 0) are ignored either way.
    position_ids: computed from the attention mask (each sample counts its own real tokens from 0), so that left
        padding does not shift positions; set `position_ids_from_mask=False` to let the model use its default.
    An empty batch (B = 0) has the loss 0, computed without running the model (see `_no_sample_losses`).
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                 position_ids_from_mask: bool = True):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is invalid; choose 'mean' or 'sum'")
        if model_head(model) != "causal_lm":
            raise UnsupportedHeadError(
                f"CausalLMLoss: {type(model).__name__} is a sequence classifier, not a causal LM: use "
                "dpcompile.hf.SequenceClassificationLoss(model) (DPTrainer picks it by itself)")
        self.model = disable_hub_kernels(model)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.position_ids_from_mask = position_ids_from_mask

    def per_sample(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) per-sample losses (see `per_sample_lm_loss`)."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        if input_ids.shape[0] == 0:
            return self._no_sample_losses(input_ids, dtype)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            cfg = getattr(self.model, "config", None)
            impl = getattr(cfg, "_attn_implementation", "sdpa")
            kwargs["attention_mask"] = causal_mask_4d(attention_mask, dtype, impl)
            if self.position_ids_from_mask:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**kwargs).logits
        return per_sample_lm_loss(logits, input_ids if labels is None else labels, ignore_index=self.ignore_index,
                                  attention_mask=attention_mask)

    def _no_sample_losses(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The (0,) losses of an empty batch, without running the model (see the module-level _no_sample_losses)."""
        return _no_sample_losses(self.model, input_ids, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        losses = self.per_sample(input_ids, attention_mask, labels)
        if self.reduction == "sum" or losses.shape[0] == 0:  # the mean of no losses is 0 here, not NaN
            return losses.sum()
        return losses.mean()


class UnsupportedHeadError(TypeError):
    """A transformers model whose head DPTrainer / the per-sample losses here do not support."""


#: what model_head accepts, for messages
SUPPORTED_HEADS = ("causal LMs (GPT2LMHeadModel, LlamaForCausalLM, ... any transformers *ForCausalLM), and sequence "
                   "classifiers of the GPT-2 and Llama families (GPT2ForSequenceClassification; "
                   "LlamaForSequenceClassification and the other decoder classifiers built on transformers' "
                   "GenericForSequenceClassification: Mistral, Qwen2, ...)")


def model_head(model: nn.Module) -> str:
    """"causal_lm" or "sequence_classification": the per-sample loss `model` trains with; raises
    UnsupportedHeadError (naming the class and what is supported) for any other transformers head.

    A module that is not a transformers model is taken to be a causal LM (anything whose output has `.logits` of
    shape (B, T, V), as CausalLMLoss documents)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None or not isinstance(model, modeling_utils.PreTrainedModel):
        return "causal_lm"
    name = type(model).__name__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if name in causal or name.endswith("ForCausalLM"):
        return "causal_lm"
    if _is_decoder_classifier(model):
        return "sequence_classification"
    raise UnsupportedHeadError(
        f"{name} is not supported: dpcompile.hf trains {SUPPORTED_HEADS}. {name}'s own loss (labels=) is a mean over "
        "the whole batch, which DP refuses; for another head, compile a module that computes each sample's loss "
        "from its logits and returns their mean (docs/huggingface.md)")


def _is_decoder_classifier(model: nn.Module) -> bool:
    try:
        from transformers import GPT2ForSequenceClassification
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:  # pragma: no cover (older transformers)
        return False
    return (isinstance(model, (GPT2ForSequenceClassification, GenericForSequenceClassification))
            and isinstance(getattr(model, "score", None), nn.Linear))


def _problem_type(config, labels: Optional[torch.Tensor]) -> str:
    """transformers' rule (GPT2ForSequenceClassification.forward): config.problem_type, else regression for one
    label, single-label classification for integer labels, multi-label otherwise."""
    kind = getattr(config, "problem_type", None)
    if kind:
        return kind
    if getattr(config, "num_labels", 2) == 1:
        return "regression"
    if labels is not None and labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "single_label_classification" if labels is None else "multi_label_classification"


def per_sample_classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                                   problem_type: str = "single_label_classification") -> torch.Tensor:
    """(B,) per-sample losses of pooled logits (B, num_labels), as transformers' sequence classifiers compute them
    for the whole batch, without the mean over samples: cross-entropy (single label), the mean squared error over
    the labels (regression) or the mean binary cross-entropy with logits over the labels (multi-label)."""
    logits = logits.to(_loss_dtype(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.reshape(-1).long(), reduction="none")
    if problem_type == "regression":
        return (logits - labels.reshape(logits.shape).to(logits.dtype)).pow(2).flatten(1).mean(1)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").flatten(1).mean(1)
    raise ValueError(f"problem_type={problem_type!r} is unknown; transformers' are 'single_label_classification', "
                     "'regression' and 'multi_label_classification'")


def last_token_one_hot(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) one-hot rows selecting each sample's last real token (the rightmost position with attention_mask 1,
    so left and right padding both work; position 0 for a sample with no real token). Pooling by multiplying with
    it and summing over T keeps samples apart; indexing with arange(B) (transformers' pooling) reads as mixing
    samples to the batch analysis."""
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device)
    last = (pos * (attention_mask != 0).to(pos.dtype)).argmax(-1)           # (B,) like transformers' last_non_pad
    return (pos[None, :] == last[:, None]).to(dtype)


class SequenceClassificationLoss(nn.Module):
    """`forward(input_ids, attention_mask=None, labels) -> loss`: the per-sample separable loss of a GPT-2 or
    Llama-family sequence classifier (GPT2ForSequenceClassification, LlamaForSequenceClassification, ...).

    Computes what the classifier computes (its backbone, its `score` layer on every position, the logits of each
    sample's last real token, transformers' loss for its problem type), per sample: sample i's loss is its own
    cross-entropy (or squared error, or binary cross-entropy), and the batch loss is the mean (or sum) of those.
    The pooling selects the last real token with a one-hot row per sample (`last_token_one_hot`), found from the
    attention mask (transformers looks for pad_token_id in input_ids instead; the two agree on padded batches).
    Position ids and the 4-D attention mask are built per sample as in CausalLMLoss.
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", position_ids_from_mask: bool = True):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is invalid; choose 'mean' or 'sum'")
        if not _is_decoder_classifier(model):
            raise UnsupportedHeadError(f"SequenceClassificationLoss: {type(model).__name__} is not a sequence "
                                       f"classifier dpcompile supports; supported: {SUPPORTED_HEADS}")
        self.model = disable_hub_kernels(model)
        self.reduction = reduction
        self.position_ids_from_mask = position_ids_from_mask

    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_labels): the logits of each sample's last real token."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        if attention_mask is None:
            pad = getattr(self.model.config, "pad_token_id", None)
            attention_mask = (torch.ones_like(input_ids) if pad is None else (input_ids != pad).long())
            four_d = None
        else:
            impl = getattr(self.model.config, "_attn_implementation", "sdpa")
            four_d = causal_mask_4d(attention_mask, dtype, impl)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if four_d is not None:
            kwargs["attention_mask"] = four_d
            if self.position_ids_from_mask:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.base_model(**kwargs).last_hidden_state             # (B, T, d)
        logits = self.model.score(hidden)                                        # (B, T, num_labels)
        pick = last_token_one_hot(attention_mask, logits.dtype)                  # (B, T)
        return (logits * pick[:, :, None]).sum(1)

    def per_sample(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) per-sample losses (see `per_sample_classification_loss`)."""
        if labels is None:
            raise ValueError("SequenceClassificationLoss needs labels (one per sample)")
        if input_ids.shape[0] == 0:
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
            return _no_sample_losses(self.model, input_ids, dtype)
        return per_sample_classification_loss(self.logits(input_ids, attention_mask), labels,
                                              _problem_type(self.model.config, labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        losses = self.per_sample(input_ids, attention_mask, labels)
        if self.reduction == "sum" or losses.shape[0] == 0:
            return losses.sum()
        return losses.mean()


def _no_sample_losses(model: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (0,) losses of an empty batch, without running the model: transformers' attention cannot run on zero
    samples (its head split `view(0, T, -1, head_dim)` is ambiguous, in eager PyTorch too). The result still
    depends on the batch input and on every trainable parameter, through empty slices (exact zeros, no work), so
    that the compiled B = 0 graph has every trainable parameter as an input and the flashdp pass gives each one a
    zero clipped sum, which DPOptimizer.step() noises like any other step's."""
    zero = input_ids.reshape(-1)[:0].sum().to(_loss_dtype(dtype))
    for p in model.parameters():
        if p.requires_grad:
            zero = zero + p.reshape(-1)[:0].sum()
    return zero.expand(0)


def loss_module(model: nn.Module, reduction: str = "mean") -> nn.Module:
    """The per-sample loss wrapper for `model`'s head: CausalLMLoss or SequenceClassificationLoss (model_head)."""
    if model_head(model) == "sequence_classification":
        return SequenceClassificationLoss(model, reduction=reduction)
    return CausalLMLoss(model, reduction=reduction)


def _field(sample, key):
    return sample.get(key) if isinstance(sample, dict) else None


def _pad_rows(rows: list, T: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), T), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=torch.long)[:T]
        out[i, :len(r)] = r
    return out


def collate_causal_lm(samples: list, pad_token_id: int = 0, max_length: Optional[int] = None,
                      pad_to_multiple_of: Optional[int] = None) -> dict:
    """Right-pads a list of 1-D token-id tensors (or lists, or dicts with "input_ids", and optionally "labels" and
    "attention_mask") into {"input_ids": (B, T) long, "attention_mask": (B, T) long[, "labels": (B, T) long]};
    T = the longest sample (or `max_length`, which also truncates), rounded up to a multiple of `pad_to_multiple_of`
    (8 makes shapes repeat: on a GPU each new shape costs host time once, benchmarks/RESULTS.md runs 34-35). Labels (transformers' convention: aligned with
    input_ids, -100 = no target; the loss shifts them) are padded with -100; a sample without labels in a batch
    where others have them gets its input_ids as labels. An empty list gives (0, 1) tensors (or (0, max_length)),
    so an empty Poisson batch still runs."""
    seqs = [torch.as_tensor(s["input_ids"] if isinstance(s, dict) else s, dtype=torch.long) for s in samples]
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    T = max([len(s) for s in seqs], default=1) if max_length is None else max_length
    if pad_to_multiple_of is not None:
        if int(pad_to_multiple_of) < 1:
            raise ValueError(f"collate_causal_lm: pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        T = -(-T // int(pad_to_multiple_of)) * int(pad_to_multiple_of)
    ids = _pad_rows(seqs, T, pad_token_id)
    masks = [_field(s, "attention_mask") for s in samples]
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        mask[i, :len(s)] = 1 if masks[i] is None else torch.as_tensor(masks[i], dtype=torch.long)[:len(s)]
    out = {"input_ids": ids, "attention_mask": mask}
    labels = [_field(s, "labels") for s in samples]
    if any(lab is not None for lab in labels):
        for i, lab in enumerate(labels):
            if lab is not None and len(torch.as_tensor(lab).reshape(-1)) != len(torch.as_tensor(
                    samples[i]["input_ids"]).reshape(-1)):
                raise ValueError(f"collate_causal_lm: sample {i} has {len(lab)} labels for "
                                 f"{len(samples[i]['input_ids'])} input ids; a causal LM's labels are one per token "
                                 "(-100 where there is no target)")
        out["labels"] = _pad_rows([seqs[i] if lab is None else lab for i, lab in enumerate(labels)], T,
                                  IGNORE_INDEX)
    return out


def collate_sequence_classification(samples: list, pad_token_id: int = 0, max_length: Optional[int] = None,
                                    pad_to_multiple_of: Optional[int] = None) -> dict:
    """collate_causal_lm for sequence classification: dicts with "input_ids" and "labels" (one per sample: an int
    class, a float for regression, or a list of floats for multi-label), right-padded; "labels" is (B,) long for
    int labels, else (B,) or (B, num_labels) float. An empty list gives 0-row tensors."""
    out = collate_causal_lm([{k: v for k, v in s.items() if k != "labels"} if isinstance(s, dict) else s
                             for s in samples], pad_token_id, max_length, pad_to_multiple_of)
    labels = [_field(s, "labels") for s in samples]
    if any(lab is None for lab in labels):
        raise ValueError("sequence classification: every training example needs its `labels` (one per sample)")
    if labels:
        t = torch.stack([torch.as_tensor(lab) for lab in labels])
        out["labels"] = t.long() if not t.is_floating_point() else t.float()
    else:
        out["labels"] = torch.zeros(0, dtype=torch.long)
    return out
