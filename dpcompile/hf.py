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

The losses live in hf_losses.py, DPTrainer and the privacy history of a checkpoint in hf_trainer.py, the switches
dpcompile.compile uses too in hf_compat.py; `dpcompile.hf` (this module) is the import path of all of them.
"""
from __future__ import annotations

from .hf_compat import disable_hub_kernels, per_token_experts, refuse_labels_loss
from .hf_losses import (  # noqa: F401  (dpcompile.hf.X, as before)
    IGNORE_INDEX, SUPPORTED_HEADS, CausalLMLoss, SequenceClassificationLoss, UnsupportedHeadError, _field,
    _is_decoder_classifier, _loss_dtype, _no_sample_losses, _pad_rows, _problem_type, causal_mask_4d,
    collate_causal_lm, collate_sequence_classification, last_token_one_hot, loss_module, model_head,
    per_sample_classification_loss, per_sample_lm_loss)
from .hf_trainer import (  # noqa: F401  (dpcompile.hf.X, as before)
    DP_CHECKPOINT_NAME, _DPTrainerMixin, _make_dp_trainer, _PoissonBatches, _trainer_base, load_privacy_history)

__all__ = ["CausalLMLoss", "SequenceClassificationLoss", "per_sample_lm_loss", "per_sample_classification_loss",
           "causal_mask_4d", "collate_causal_lm", "collate_sequence_classification", "DPTrainer",
           "disable_hub_kernels", "per_token_experts", "refuse_labels_loss", "model_head", "loss_module",
           "last_token_one_hot",
           "UnsupportedHeadError", "load_privacy_history", "DP_CHECKPOINT_NAME"]


def __getattr__(name: str):
    # DPTrainer subclasses transformers.Trainer, so it is built on first use: importing dpcompile.hf stays cheap.
    if name == "DPTrainer":
        cls = _make_dp_trainer()
        globals()["DPTrainer"] = cls
        return cls
    raise AttributeError(name)
