"""Hugging Face transformers models under DP: a per-sample causal-LM loss, and a Trainer that trains privately.

A transformers model's own loss (`model(input_ids, labels=labels).loss`) is the token mean over the *whole batch*
(a batch-wide normaliser: one sample's token count changes every other sample's weight), which DP refuses. Wrap the
model in `CausalLMLoss` instead: every sample's loss is the mean over *its own* real tokens, and the batch loss is
the mean (or sum) of those::

    loss_model = dpcompile.hf.CausalLMLoss(model)                 # model: any *ForCausalLM, trained in place
    dp_model = dpcompile.compile(loss_model, max_grad_norm=1.0)   # or make_private(loss_model, ...)
    loss = dp_model(input_ids, attention_mask)                    # (B, T) each; padding is masked per sample
    loss.backward()

`model` is trained in place (the wrapper holds it), so `model.generate()` and `model.save_pretrained()` work on it
afterwards as usual. Padding: positions where `attention_mask == 0` (or `labels == ignore_index`) give no loss,
and position ids count each sample's real tokens, so a right- or left-padded sample has exactly the loss and the
gradient it has alone without padding.

An empty batch (B = 0, which Poisson sampling produces) gives a zero loss without running the model, so that a DP
step still takes place (zero clipped sums, then the noise). Hub kernels (transformers >= 5 installs the `kernels`
package) are turned off for every model dpcompile trains: see `disable_hub_kernels`.

Sequence classifiers of the GPT-2 and Llama families (GPT2ForSequenceClassification, LlamaForSequenceClassification,
...) get `SequenceClassificationLoss`, the same idea for one label per sample; other heads are refused
(`model_head`, UnsupportedHeadError).

`DPTrainer` is a `transformers.Trainer` whose steps are DP-SGD steps, whose checkpoints hold the privacy state
(`dp_checkpoint.pt`) and resume exactly, and which continues a model's earlier DP history (see its docstring).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hf_compat import disable_hub_kernels, per_token_experts, refuse_labels_loss

__all__ = ["CausalLMLoss", "SequenceClassificationLoss", "per_sample_lm_loss", "per_sample_classification_loss",
           "causal_mask_4d", "collate_causal_lm", "collate_sequence_classification", "DPTrainer",
           "disable_hub_kernels", "per_token_experts", "refuse_labels_loss", "model_head", "loss_module",
           "last_token_one_hot",
           "UnsupportedHeadError", "load_privacy_history", "DP_CHECKPOINT_NAME"]

IGNORE_INDEX = -100

#: the file, next to a transformers checkpoint, holding a DP run's privacy state (`dpcompile.save_checkpoint` with
#: module=None: optimizer with its accountant history, noise generator and privacy plan, sampler stream); written by
#: `dpcompile train` into its output directory and by DPTrainer into every checkpoint-N directory
DP_CHECKPOINT_NAME = "dp_checkpoint.pt"


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


def collate_causal_lm(samples: list, pad_token_id: int = 0, max_length: Optional[int] = None) -> dict:
    """Right-pads a list of 1-D token-id tensors (or lists, or dicts with "input_ids", and optionally "labels" and
    "attention_mask") into {"input_ids": (B, T) long, "attention_mask": (B, T) long[, "labels": (B, T) long]};
    T = the longest sample (or `max_length`, which also truncates). Labels (transformers' convention: aligned with
    input_ids, -100 = no target; the loss shifts them) are padded with -100; a sample without labels in a batch
    where others have them gets its input_ids as labels. An empty list gives (0, 1) tensors (or (0, max_length)),
    so an empty Poisson batch still runs."""
    seqs = [torch.as_tensor(s["input_ids"] if isinstance(s, dict) else s, dtype=torch.long) for s in samples]
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    T = max([len(s) for s in seqs], default=1) if max_length is None else max_length
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


def collate_sequence_classification(samples: list, pad_token_id: int = 0, max_length: Optional[int] = None) -> dict:
    """collate_causal_lm for sequence classification: dicts with "input_ids" and "labels" (one per sample: an int
    class, a float for regression, or a list of floats for multi-label), right-padded; "labels" is (B,) long for
    int labels, else (B,) or (B, num_labels) float. An empty list gives 0-row tensors."""
    out = collate_causal_lm([{k: v for k, v in s.items() if k != "labels"} if isinstance(s, dict) else s
                             for s in samples], pad_token_id, max_length)
    labels = [_field(s, "labels") for s in samples]
    if any(lab is None for lab in labels):
        raise ValueError("sequence classification: every training example needs its `labels` (one per sample)")
    if labels:
        t = torch.stack([torch.as_tensor(lab) for lab in labels])
        out["labels"] = t.long() if not t.is_floating_point() else t.float()
    else:
        out["labels"] = torch.zeros(0, dtype=torch.long)
    return out


def _trainer_base():
    try:
        from transformers import Trainer
    except ImportError as e:  # pragma: no cover
        raise ImportError("dpcompile.hf.DPTrainer needs transformers: pip install transformers") from e
    return Trainer


class _PoissonBatches:
    """An iterable of Poisson logical batches for Trainer: each item is the list of physical micro-batches."""

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def load_privacy_history(path) -> Optional[dict]:
    """The accountant state (`PrivacyAccountant.state_dict()`: its history of (σ, q, count) steps) that the DP
    runs behind a model checkpoint spent, or None when it records none.

    path: a directory (a `dpcompile train` output, a DPTrainer checkpoint-N directory, or any `save_pretrained`
    directory) or a dpcompile checkpoint file. Read from its `dp_checkpoint.pt`, else from the "accountant" entry of
    its `dp_report.json` (what `dpcompile train` writes). A non-private `dpcompile train --no-dp` run records
    steps with σ = 0 (ε = inf): its model carries no DP guarantee for the data it saw."""
    import json
    import os

    path = os.fspath(path)
    file = os.path.join(path, DP_CHECKPOINT_NAME) if os.path.isdir(path) else path
    if os.path.isfile(file):
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "dpcompile.checkpoint":
            raise ValueError(f"{file} is not a dpcompile checkpoint")
        acc = state.get("accountant")
        if acc is None and isinstance(state.get("optimizer"), dict):
            acc = state["optimizer"].get("accountant")
        if acc is None and isinstance(state.get("extra"), dict):
            acc = state["extra"].get("accountant")
        return acc if acc and acc.get("history") else None
    report = os.path.join(path, "dp_report.json") if os.path.isdir(path) else None
    if report and os.path.isfile(report):
        with open(report) as f:
            acc = json.load(f).get("accountant")
        return acc if acc and acc.get("history") else None
    return None


# DPTrainer's methods: a mixin, so that importing dpcompile.hf does not import transformers (DPTrainer,
# built on first use by _make_dp_trainer, is `class DPTrainer(_DPTrainerMixin, transformers.Trainer)`).
class _DPTrainerMixin:
    """A transformers.Trainer whose every optimizer step is a DP-SGD step.

        trainer = dpcompile.hf.DPTrainer(model=model, args=TrainingArguments(output_dir=..., num_train_epochs=3,
                                         per_device_train_batch_size=8, learning_rate=5e-4),
                                         train_dataset=ds,  # items: token-id lists/tensors or {"input_ids": ...}
                                         target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0,
                                         expected_batch_size=64)
        trainer.train(); print(trainer.get_epsilon())

    What changes against a plain Trainer:
    - batches are Poisson-sampled (each example joins a step with probability q = expected_batch_size / N);
      a step's sampled examples are split into micro-batches of at most `per_device_train_batch_size` and the
      per-sample clipped gradients of all of them are summed before the noise is added once;
    - the loss is per sample, compiled with the flashdp backend: `CausalLMLoss` (per-sample token means over
      each sample's own targets; a dataset's `labels`, -100 = no target, are honoured) for a causal LM, and
      `SequenceClassificationLoss` for a GPT-2 or Llama-family sequence classifier (items with one `labels`
      each); any other head is refused (UnsupportedHeadError). The optimizer is wrapped in `DPOptimizer` (noise
      sigma calibrated for `target_epsilon` over `num_train_epochs` or `max_steps`; a step past the target is
      refused unless allow_overspend=True);
    - Trainer's own gradient clipping, gradient accumulation and data collator are off (the DP step replaces
      them); `gradient_accumulation_steps` must be 1 and `max_grad_norm` in the TrainingArguments is set to 0
      (the per-sample `max_grad_norm` given here is the one that counts);
    - every batch is right-padded to one length, `max_length` (default: the longest training example), so that
      one compiled graph serves every step (padding is masked per sample; it changes no sample's gradient);
    - checkpoints (Trainer's save_strategy) hold, next to the model, `dp_checkpoint.pt`
      (`dpcompile.save_checkpoint`: DPOptimizer with its accountant history, noise generator and privacy plan;
      the Poisson sampler's stream and position), which replaces optimizer.pt; `train(resume_from_checkpoint=...)`
      continues the run exactly where it stopped (same batches, same noise);
    - a model loaded from a directory that records a DP history (`dp_checkpoint.pt` or `dp_report.json`: a
      `dpcompile train` output, a DPTrainer checkpoint) continues it (privacy_history="auto"): the accountant
      starts from that history, epsilon is the composition, and target_epsilon applies to the total.
    Logged metrics gain `epsilon` (spent so far at `target_delta`) and lose `grad_norm` (the norm of the
    gradient before the noise is not private).
    max_grad_norm="adaptive": adaptive clipping (docs/privacy.md): each clipping group's threshold follows a
    quantile of its per-sample norms, estimated privately every step; `adaptive_clipping` takes its options
    {target_quantile (0.5), clip_learning_rate (0.2), initial_max_grad_norm (1.0), quantile_noise_std
    (expected batch / 20)}. The epsilon is that of noise_multiplier (or the one calibrated for target_epsilon):
    the gradient noise is raised so that the gradient and quantile releases together cost it. Logs gain
    `max_grad_norm` (the current total threshold).
    """

    def __init__(self, *args, target_epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
                 target_delta: float = 1e-5, max_grad_norm: float = 1.0, clipping="per_layer",
                 expected_batch_size: Optional[int] = None, backend: Optional[str] = None,
                 secure_mode: bool = False, pad_token_id: Optional[int] = None,
                 max_length: Optional[int] = None, allow_overspend: bool = False,
                 privacy_history: Any = "auto", adaptive_clipping: Optional[dict] = None, **kwargs):
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("DPTrainer: give exactly one of target_epsilon or noise_multiplier")
        model = kwargs.get("model", args[0] if args else None)
        head = model_head(model) if model is not None else "causal_lm"  # refuses other heads, naming them
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("DPTrainer: gradient_accumulation_steps must be 1; a Poisson logical batch of "
                             "expected_batch_size examples is split into micro-batches of at most "
                             "per_device_train_batch_size by the trainer itself")
        self.args.max_grad_norm = 0.0
        self.dp_head = head
        self.dp_target_epsilon = target_epsilon
        self.dp_noise_multiplier = noise_multiplier
        self.dp_target_delta = target_delta
        self.dp_max_grad_norm = max_grad_norm
        if adaptive_clipping is not None and max_grad_norm != "adaptive":
            raise ValueError("DPTrainer: adaptive_clipping= needs max_grad_norm='adaptive'")
        self.dp_adaptive_clipping = (dict(adaptive_clipping or {}) if max_grad_norm == "adaptive" else None)
        self.dp_clipping = clipping
        self.dp_expected_batch_size = expected_batch_size or self.args.per_device_train_batch_size
        self.dp_backend = backend or ("flashdp" if self.args.device.type == "cuda" else "flashdp_eager")
        self.dp_secure_mode = secure_mode
        self.dp_allow_overspend = allow_overspend
        cfg = getattr(self.model, "config", None)
        self.dp_pad_token_id = pad_token_id if pad_token_id is not None else (
            getattr(cfg, "pad_token_id", None) or getattr(cfg, "eos_token_id", None) or 0)
        if isinstance(self.dp_pad_token_id, (list, tuple)):
            self.dp_pad_token_id = self.dp_pad_token_id[0]
        self.dp_max_length = max_length
        if isinstance(privacy_history, str) and privacy_history == "auto":
            source = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
            import os

            privacy_history = source if source and os.path.isdir(source) else None
        if privacy_history is None or privacy_history is False:
            self.dp_prior_history = None
        elif isinstance(privacy_history, dict):
            self.dp_prior_history = privacy_history if privacy_history.get("history") else None
        else:
            self.dp_prior_history = load_privacy_history(privacy_history)
        self._dp_loader = None
        self._dp_loss = None

    # -- data: Poisson logical batches ----------------------------------------------------------------
    def _dp_poisson_loader(self):
        from .privacy.sampling import PoissonDataLoader

        if self._dp_loader is None:
            if self.train_dataset is None:
                raise ValueError("DPTrainer: train_dataset is required")
            n = len(self.train_dataset)
            if not 0 < self.dp_expected_batch_size <= n:
                raise ValueError(f"DPTrainer: expected_batch_size={self.dp_expected_batch_size} must be in "
                                 f"(0, len(train_dataset)={n}]")
            gen = None if self.dp_secure_mode else torch.Generator().manual_seed(self.args.seed)
            pad = self.dp_pad_token_id
            if self.dp_max_length is None:  # one padded length for every batch: one compiled graph
                self.dp_max_length = max(len(s["input_ids"] if isinstance(s, dict) else s)
                                         for s in self.train_dataset)
            T = self.dp_max_length
            collate = (collate_sequence_classification if self.dp_head == "sequence_classification"
                       else collate_causal_lm)
            self._dp_loader = PoissonDataLoader(
                self.train_dataset, expected_batch_size=self.dp_expected_batch_size,
                max_physical_batch_size=self.args.per_device_train_batch_size, generator=gen,
                secure_mode=self.dp_secure_mode, collate_fn=lambda s: collate(s, pad, T))
        return self._dp_loader

    def get_train_dataloader(self):
        return _PoissonBatches(self._dp_poisson_loader())

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        # Trainer would skip the first batches of the epoch by iterating past them; the Poisson sampler's stream
        # and position were restored from dp_checkpoint.pt instead (_load_optimizer_and_scheduler), so its next
        # pass is exactly the rest of the pass the checkpoint was taken in.
        return dataloader

    # -- optimizer: DPOptimizer around Trainer's own ---------------------------------------------------
    def _dp_planned_steps(self, loader) -> int:
        steps = max(1, math.ceil(self.args.num_train_epochs * len(loader)))
        if self.args.max_steps and self.args.max_steps > 0:
            steps = self.args.max_steps
        return steps

    def create_optimizer(self, *args, **kwargs):
        from .privacy.accounting import PrivacyAccountant, get_noise_multiplier
        from .privacy.optimizer import DPOptimizer

        opt = super().create_optimizer(*args, **kwargs)
        if isinstance(opt, DPOptimizer):
            return opt
        loader = self._dp_poisson_loader()
        q = loader.sample_rate
        steps = self._dp_planned_steps(loader)
        accountant = PrivacyAccountant("pld")
        if self.dp_prior_history is not None:
            accountant.load_state_dict(self.dp_prior_history)
        sigma = self.dp_noise_multiplier
        if sigma is None:
            history = accountant.history
            try:
                sigma = get_noise_multiplier(self.dp_target_epsilon, self.dp_target_delta, q, steps,
                                             history=history or None)
            except ValueError as err:
                if not (history and self.dp_allow_overspend):
                    raise ValueError(f"DPTrainer: {err}. The model's earlier DP training (privacy_history) "
                                     "counts against target_epsilon; pass allow_overspend=True to train "
                                     "anyway (epsilon then reports the true total), or "
                                     "privacy_history=None if that history is not about this data") from None
                sigma = get_noise_multiplier(self.dp_target_epsilon, self.dp_target_delta, q, steps)
        gen = None if self.dp_secure_mode else torch.Generator(self.args.device).manual_seed(self.args.seed + 1)
        if self.dp_adaptive_clipping is not None:  # a sigma the quantile release leaves no room for: refused
            from .privacy.engine import check_adaptive_noise

            check_adaptive_noise(loss_module(self.model), {"max_grad_norm": "adaptive",
                                                            "clipping": self.dp_clipping},
                                  sigma, q * len(loader.dataset), self.dp_adaptive_clipping)
        dp_opt = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=self.dp_max_grad_norm,
                             expected_batch_size=q * len(loader.dataset), loss_reduction="mean",
                             secure_mode=self.dp_secure_mode, generator=gen, accountant=accountant,
                             sample_rate=q, adaptive_clipping=self.dp_adaptive_clipping)
        dp_opt.target_delta = self.dp_target_delta
        if self.dp_target_epsilon is not None:
            dp_opt.plan(target_epsilon=self.dp_target_epsilon, target_delta=self.dp_target_delta,
                        steps=accountant.steps + steps, allow_overspend=self.dp_allow_overspend)
        dp_opt.allow_overspend = bool(self.dp_allow_overspend)
        loader.attach_optimizer(dp_opt)  # it tells the optimizer each logical batch: misuse is refused
        self.optimizer = dp_opt
        return self.optimizer

    def _dp_optimizer(self):
        from .privacy.optimizer import DPOptimizer

        opt = self.optimizer
        while opt is not None and not isinstance(opt, DPOptimizer):
            opt = getattr(opt, "optimizer", None)
        return opt

    # -- checkpoints: dp_checkpoint.pt next to the model -----------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import os

        from .privacy.checkpoint import save_checkpoint

        opt = self._dp_optimizer()
        if opt is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_checkpoint(os.path.join(output_dir, DP_CHECKPOINT_NAME), module=None, optimizer=opt,
                            data_loader=self._dp_poisson_loader(),
                            extra={"global_step": self.state.global_step, "head": self.dp_head})
            if self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        import os

        from .privacy.checkpoint import load_checkpoint

        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DP_CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"DPTrainer: {checkpoint} holds no {DP_CHECKPOINT_NAME}: it was not written by DPTrainer (or was "
                "saved with save_only_model=True), so the privacy its steps spent and the sampling stream are "
                "unknown. Resume from a checkpoint-N directory that DPTrainer wrote")
        load_checkpoint(path, optimizer=self._dp_optimizer(), data_loader=self._dp_poisson_loader())
        sched = os.path.join(checkpoint, "scheduler.pt")
        if self.lr_scheduler is not None and os.path.isfile(sched):
            self.lr_scheduler.load_state_dict(torch.load(sched, map_location="cpu", weights_only=True))

    # -- one logical batch: per-sample clipped sums over its micro-batches ------------------------------
    def _dp_compiled_loss(self, model):
        from .compile import compile as dp_compile

        if self._dp_loss is None or self._dp_loss.module.model is not model:
            self._dp_loss = dp_compile(loss_module(model), backend=self.dp_backend,
                                       max_grad_norm=self.dp_max_grad_norm, clipping=self.dp_clipping,
                                       loss_reduction="mean")
        return self._dp_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        loss_fn = self._dp_compiled_loss(self.accelerator.unwrap_model(model))
        device = self.args.device
        total, count = 0.0, 0
        for mb in inputs:
            ids, mask = mb["input_ids"].to(device), mb["attention_mask"].to(device)
            labels = mb.get("labels")
            if labels is None:
                loss = loss_fn(ids, mask)
            else:
                loss = loss_fn(ids, mask, labels.to(device))
            loss.backward()
            total += float(loss.detach()) * ids.shape[0]
            count += ids.shape[0]
        return torch.tensor(total / max(count, 1), device=device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # evaluation: the same per-sample losses as training (no DP needed)
        per_sample = loss_module(self.accelerator.unwrap_model(model)).per_sample(
            inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"))
        loss = per_sample.mean()
        return (loss, None) if return_outputs else loss

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far at `delta` (default the trainer's target_delta), earlier runs' history
        (privacy_history) included."""
        opt = self._dp_optimizer()
        if opt is None:
            return 0.0
        return opt.get_epsilon(delta if delta is not None else self.dp_target_delta)

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer would log the norm of .grad before the optimizer step: the clipped sum *before* the noise, a
        # statistic of the batch that is not private. Never compute it.
        return None

    def log(self, logs: dict, *args, **kwargs):
        logs = {k: v for k, v in logs.items() if k != "grad_norm"}  # (see _get_grad_norm)
        if self.optimizer is not None:
            logs = {**logs, "epsilon": round(self.get_epsilon(), 4)}
            opt = self._dp_optimizer()
            if opt is not None and getattr(opt, "adaptive", None) is not None:
                logs["max_grad_norm"] = round(opt.max_grad_norm_total, 6)
        return super().log(logs, *args, **kwargs)


def __getattr__(name: str):
    # DPTrainer subclasses transformers.Trainer, so it is built on first use: importing dpcompile.hf stays cheap.
    if name == "DPTrainer":
        cls = _make_dp_trainer()
        globals()["DPTrainer"] = cls
        return cls
    raise AttributeError(name)


def _make_dp_trainer():
    Trainer = _trainer_base()

    class DPTrainer(_DPTrainerMixin, Trainer):
        __doc__ = _DPTrainerMixin.__doc__

    return DPTrainer
