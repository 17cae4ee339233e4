"""dpcompile.memarc: LoRA, adapters, ladder side network and reversible couplings on tiny random HF GPT-2 / Llama.

- every transformation computes exactly the pretrained function at initialisation (float64);
- compiled with flashdp, the trainable parameters' gradients are the float64 oracle's clipped per-sample sums and the
  frozen parameters get no gradient (the reversible model's oracle runs the same function through plain autograd,
  so the hand-written backward is checked too);
- what the compiled graph keeps for backward: nothing of the side network's backbone but the taps, and nothing of
  the reversible model's backbone but the layer boundaries;
- the API's refusals (implicit clipping, flat clipping with recomputation, parameters unfrozen by hand).
"""
from __future__ import annotations

import copy

import pytest
import torch

import models
from dpcompile import DPCompileError, OptionsError, memarc
from dpcompile.memarc import per_sample_lm_loss
from dpcompile.memarc.reversible import _RevCouplingFn
from dpcompile.testing import oracle

# HF Llama's RMSNorm computes in float32 even in a float64 model (as in test_models.py)
TOL = {"gpt2": dict(atol=1e-9, rtol=1e-7), "llama": dict(atol=1e-7, rtol=1e-5)}
KW = {"full": {}, "lora": dict(rank=2), "adapters": dict(bottleneck=3), "side": dict(reduction=4),
      "reversible": dict(bottleneck=3)}


def _lm(family, n_embd=16):
    if family == "gpt2":
        return models.hf_gpt2(n_embd=n_embd, n_layer=2)
    return models.hf_llama(hidden=n_embd, layers=2)


def _perturbed(model, seed=5, scale=0.1):
    """Move every trainable parameter off its (often zero) initial value so that every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _loss_sum(m, idx, tgt):  # the oracle's loss: a sum over samples
    return per_sample_lm_loss(m(idx), tgt, reduction="sum")


def _check_against_oracle(model, reference, batch, family, *, clipping, max_grad_norm, loss_reduction,
                          accept_flat_cost=False, saved=None):
    """Compile `model` (float64, flashdp_eager), one backward, compare with the loop oracle run on `reference`."""
    model = copy.deepcopy(model).double()
    torch._dynamo.reset()
    compiled = memarc.compile(model, clipping=clipping, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                              accept_flat_cost=accept_flat_cost, backend="flashdp_eager")
    loss = compiled(*batch)
    if saved is not None:  # a second forward whose saved tensors are recorded (the first one compiled the graph)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = compiled(*batch)
    loss.backward()
    want = oracle.reference_clipped_grads(reference, _loss_sum, batch, max_grad_norm=max_grad_norm, clipping=clipping)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(want) == set(model.trainable_names())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
    tol = TOL[family]
    for n, w in want.items():
        g = trainable[n].grad
        assert g is not None, f"{n} got no gradient"
        err = (g - w).abs().max().item()
        assert err <= tol["atol"] + tol["rtol"] * w.abs().max().item(), f"{n}: max err {err:.3e}"
    assert any(w.abs().max() > 0 for w in want.values())
    return model


def _activations(saved, model):
    """The saved tensors that are not (views of) parameters or buffers."""
    storages = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    return [t for t in saved if t.untyped_storage().data_ptr() not in storages]


# -- the pretrained function at initialisation ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora", "adapters", "side", "reversible"])
def test_pretrained_function_at_init(family, method):
    case = _lm(family)
    lm = case.model.double()
    model = memarc.METHODS[method](lm, **KW[method])
    idx, tgt = case.batch(3, seed=1)
    with torch.no_grad():
        want = lm(input_ids=idx, use_cache=False).logits
        torch.testing.assert_close(model(idx), want, rtol=0, atol=1e-12)
    with torch.enable_grad():  # the memory-efficient paths (checkpoint, custom Function) compute the same
        torch.testing.assert_close(model(idx).detach(), want, rtol=0, atol=1e-12)
    # the original model is untouched and the transformation trains only its own parameters
    assert all(p.requires_grad for p in lm.parameters())
    trainable = model.trainable_names()
    assert trainable and sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    new = {"lora": "lora_", "adapters": "adapter.", "side": "side.", "reversible": "coupling."}.get(method)
    if new:
        assert all(new in n for n in trainable), trainable
    else:  # full fine-tuning trains everything but the embeddings
        assert not any("wte" in n or "wpe" in n or "embed_tokens" in n for n in trainable)


def test_lora_merge_and_conv1d():
    case = _lm("gpt2")
    lm = case.model.double()
    model = _perturbed(memarc.lora(lm, rank=2, targets="all"))
    assert len(model.trainable_names()) == 2 * 4 * 2  # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj, 2 layers
    idx, _ = case.batch(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(memarc.merge_lora(model)(input_ids=idx, use_cache=False).logits, model(idx))


def test_loss_is_per_sample_mean():
    case = _lm("llama")
    model = memarc.full(case.model.double())
    idx, tgt = case.batch(3, seed=4)
    tgt[0, :3] = memarc.IGNORE_INDEX
    tgt[2, :] = memarc.IGNORE_INDEX  # an empty sample contributes 0
    logits = model(idx)
    each = []
    for i in range(3):
        keep = tgt[i] != memarc.IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits[i][keep], tgt[i][keep]) if keep.any() else logits.new_zeros(())
        each.append(ce)
    torch.testing.assert_close(model(idx, tgt), torch.stack(each).mean())


# -- the reversible coupling ---------------------------------------------------------------------------------------


def test_coupling_inverse_and_hand_written_backward():
    coupling = memarc.RevCoupling(7, 3, std=0.5, dtype=torch.float64)
    _perturbed(coupling, scale=0.5)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(coupling.inverse(coupling(x)), x, rtol=0, atol=1e-13)
    params = coupling.F.params() + coupling.G.params()
    assert torch.autograd.gradcheck(lambda x, *p: _RevCouplingFn.apply(x, coupling.d1, *p), (x, *params))


# -- gradients through the flashdp backend -----------------------------------------------------------------------


def test_side_network_gpt2_matches_oracle_and_keeps_no_backbone_activation():
    case = _lm("gpt2", n_embd=40)  # widths 40 (d), 120 (qkv), 160 (mlp); side width 8, side mlp 32
    model = _perturbed(memarc.side_network(case.model, reduction=5, n_head=2))
    assert model.info["taps"] == [1, 2]
    saved = []
    compiled = _check_against_oracle(model, model, case.batch(3, seed=1), "gpt2", clipping="per_layer",
                                     max_grad_norm=0.05, loss_reduction="mean", saved=saved)
    acts = _activations(saved, compiled)
    assert acts
    d, B, T = 40, 3, 8
    for t in acts:
        assert t.shape[-1] not in (3 * d, 4 * d), f"a backbone projection's activation is kept: {tuple(t.shape)}"
        assert not (t.dim() >= 3 and t.shape[-1] == t.shape[-2] == T and t.numel() == B * 2 * T * T), \
            f"backbone attention probabilities are kept: {tuple(t.shape)}"
    width_d = [t for t in acts if t.shape[-1] == d]
    assert len(width_d) <= 3, [tuple(t.shape) for t in width_d]  # the taps h_0, h_1, h_2 and nothing else


def test_side_network_llama_flat_sum_matches_oracle():
    case = _lm("llama")
    model = _perturbed(memarc.side_network(case.model, reduction=4, ladder_layers=[2]))
    assert model.info["taps"] == [2] and len(model.side.blocks) == 1
    _check_against_oracle(model, model, case.batch(4, seed=2), "llama", clipping="flat", max_grad_norm=1e6,
                          loss_reduction="sum")


def test_reversible_gpt2_matches_oracle_and_keeps_only_layer_boundaries():
    case = _lm("gpt2", n_embd=40)
    model = _perturbed(memarc.reversible(case.model, bottleneck=5))
    reference = copy.deepcopy(model).set_memory_efficient(False)  # plain autograd: checks the custom backward
    saved = []
    compiled = _check_against_oracle(model, reference, case.batch(3, seed=1), "gpt2", clipping="per_layer",
                                     max_grad_norm=0.05, loss_reduction="mean", saved=saved)
    acts = _activations(saved, compiled)
    d, r, B, T = 40, 5, 3, 8
    shapes = [tuple(t.shape) for t in acts]
    for t in acts:
        if t.dim() >= 2:  # (the coupling's bottleneck and half-state activations are rebuilt, not kept)
            assert t.shape[-1] not in (3 * d, 4 * d, r, d // 2), f"kept for backward: {tuple(t.shape)} ({shapes})"
        assert not (t.dim() >= 3 and t.shape[-1] == t.shape[-2] == T and t.numel() == B * 2 * T * T), \
            f"backbone attention probabilities are kept: {shapes}"
    # the boundary between the two layers and the final hidden state (the input of the final LayerNorm)
    assert len([t for t in acts if t.shape[-1] == d]) <= 2, shapes


def test_reversible_llama_flat_needs_consent_then_matches_oracle():
    case = _lm("llama")
    model = _perturbed(memarc.reversible(case.model, bottleneck=3))
    with pytest.raises(DPCompileError, match="clipping='flat'"):
        memarc.compile(model, clipping="flat", max_grad_norm=1.0, backend="flashdp_eager")
    reference = copy.deepcopy(model).set_memory_efficient(False)
    _check_against_oracle(model, reference, case.batch(3, seed=2), "llama", clipping="flat", max_grad_norm=0.5,
                          loss_reduction="mean", accept_flat_cost=True)


def test_lora_gpt2_conv1d_matches_oracle():
    case = _lm("gpt2")
    model = _perturbed(memarc.lora(case.model, rank=2, targets="all"))
    _check_against_oracle(model, model, case.batch(3, seed=3), "gpt2", clipping="per_param", max_grad_norm=1e-3,
                          loss_reduction="mean")


def test_adapters_llama_matches_oracle():
    case = _lm("llama")
    model = _perturbed(memarc.adapters(case.model, bottleneck=3))
    _check_against_oracle(model, model, case.batch(3, seed=4), "llama", clipping="per_layer", max_grad_norm=2.0,
                          loss_reduction="sum")


# -- refusals -----------------------------------------------------------------------------------------------------


def test_clipping_is_explicit_and_trainables_are_checked():
    case = _lm("gpt2")
    model = memarc.side_network(case.model, reduction=4)
    with pytest.raises(TypeError):
        memarc.compile(model, max_grad_norm=1.0)  # no default clipping style
    with pytest.raises(OptionsError):
        memarc.compile(model, clipping=None, max_grad_norm=1.0)
    model.lm.base_model.h[0].layer.ln_1.weight.requires_grad_(True)  # would run under no_grad: silently untrained
    with pytest.raises(DPCompileError, match="unexpectedly trainable"):
        memarc.compile(model, clipping="per_layer", max_grad_norm=1.0)
    with pytest.raises(DPCompileError, match="reduction"):
        memarc.side_network(case.model, reduction=3)
    with pytest.raises(DPCompileError, match="not a Hugging Face causal LM"):
        memarc.lora(models.mlp().model)


def test_bench_memarc_smoke_parallel_handshake(tmp_path):
    """benchmarks/bench_memarc.py --small with two modes warmed up at once: both rows come back timed, and the
    ratios are against dp-full of the same run."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = tmp_path / "results.json"
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_memarc.py"), "--small",
                        "--workloads", "gpt2-large", "--modes", "dp-full,dp-side", "--parallel", "2",
                        "--steps", "1", "--warmup", "1", "--results", str(results)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(results.read_text())
    assert [r["mode"] for r in rows] == ["dp-full", "dp-side"]
    assert all(r["tokens_per_s"] > 0 and r["baseline"] == "dp-full" for r in rows), rows
    assert rows[0]["throughput_ratio"] == 1.0
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]
