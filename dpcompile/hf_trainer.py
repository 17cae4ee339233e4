"""DPTrainer of `dpcompile.hf` (which re-exports everything here: import from there): its methods
(`_DPTrainerMixin`; `dpcompile.hf.DPTrainer` is built from them on first use by `_make_dp_trainer`), the Poisson
batches it hands to Trainer, and the DP checkpoint file and privacy history it shares with `dpcompile train`
(DP_CHECKPOINT_NAME, load_privacy_history). Importing this module does not import transformers.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .hf_losses import collate_causal_lm, collate_sequence_classification, loss_module, model_head

#: the file, next to a transformers checkpoint, holding a DP run's privacy state (`dpcompile.save_checkpoint` with
#: module=None: optimizer with its accountant history, noise generator and privacy plan, sampler stream); written by
#: `dpcompile train` into its output directory and by DPTrainer into every checkpoint-N directory
DP_CHECKPOINT_NAME = "dp_checkpoint.pt"


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
      one compiled graph, compiled for that length, serves every step (padding is masked per sample; it changes
      no sample's gradient);
      with `pad_to_multiple_of=k` instead, each batch is padded to its own longest example rounded up to a
      multiple of k (the sequence length is symbolic in the compiled graph: still one graph, less padding on
      short-text data; k = 8 lets a run see each shape many times, benchmarks/RESULTS.md runs 34–35);
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
                 max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 allow_overspend: bool = False,
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
        if pad_to_multiple_of is not None:
            if max_length is not None:
                raise ValueError("DPTrainer: give max_length (every batch padded to it) or pad_to_multiple_of "
                                 "(each batch padded to its longest example, rounded up), not both")
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"DPTrainer: pad_to_multiple_of={pad_to_multiple_of!r} must be an int >= 1")
        self.dp_pad_to_multiple_of = pad_to_multiple_of
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
            multiple = self.dp_pad_to_multiple_of
            if self.dp_max_length is None and multiple is None:  # one padded length for every batch
                self.dp_max_length = max(len(s["input_ids"] if isinstance(s, dict) else s)
                                         for s in self.train_dataset)
            T = self.dp_max_length
            collate = (collate_sequence_classification if self.dp_head == "sequence_classification"
                       else collate_causal_lm)
            self._dp_loader = PoissonDataLoader(
                self.train_dataset, expected_batch_size=self.dp_expected_batch_size,
                max_physical_batch_size=self.args.per_device_train_batch_size, generator=gen,
                secure_mode=self.dp_secure_mode, collate_fn=lambda s: collate(s, pad, T, multiple))
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
            # every batch padded to max_length: one length, compiled static (faster to compile, no symbolic
            # length); pad_to_multiple_of: the length changes with the batch, compiled symbolic (one graph)
            self._dp_loss = dp_compile(loss_module(model), backend=self.dp_backend,
                                       max_grad_norm=self.dp_max_grad_norm, clipping=self.dp_clipping,
                                       loss_reduction="mean", dynamic_seq=self.dp_pad_to_multiple_of is not None)
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


def _make_dp_trainer():
    Trainer = _trainer_base()

    class DPTrainer(_DPTrainerMixin, Trainer):
        __doc__ = _DPTrainerMixin.__doc__

    return DPTrainer
