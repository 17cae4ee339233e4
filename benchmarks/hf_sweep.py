"""Every causal-LM architecture of the installed transformers (and the GPT-2 / Llama / BERT / RoBERTa
sequence-classification heads), built tiny from its config and trained one step through dpcompile, against the
float64 batch-of-one oracle.

Each architecture gets one verdict:

    exact      every parameter's .grad equals the oracle's clipped sum at a small C (every sample clipped) and at
               a large C (none clipped); parameters the forward never uses may keep None (as in eager PyTorch)
    mismatch   some .grad differs from the oracle: the worst parameter and its error are recorded.
               A mismatch is a silent non-private gradient: the worst outcome.
    refused    dpcompile raised one of its own errors (dpcompile/errors.py, or dpcompile.hf.UnsupportedHeadError)
    crash      any other exception under dpcompile (its type, first line, innermost frame)
    timeout    the architecture ran past its time limit (a hang is a verdict too)
    died       its process ended without a result (a segfault, the OOM killer)
    no_eager   it does not run without dpcompile: building the tiny model, one eager training step, or the
               float64 oracle failed (the error is recorded; these are not held against dpcompile)

Every architecture runs in its own process, forked from a parent that has imported torch, transformers and
dpcompile once (so a crash, a hang or a segfault costs one verdict, not the sweep).

    .venv/bin/python benchmarks/hf_sweep.py --jobs 1 --timeout 240 --out benchmarks/hf_sweep.jsonl  # all (2-4 h)
    .venv/bin/python benchmarks/hf_sweep.py --only gpt2,llama,bert:seqcls             # some
    .venv/bin/python benchmarks/hf_sweep.py --summary benchmarks/hf_sweep.jsonl        # the table of a past run
    .venv/bin/python benchmarks/hf_sweep.py --only mamba,mixtral --out /tmp/some.jsonl \
        --merge-into benchmarks/hf_sweep.jsonl                                          # re-measure some

Names are transformers model types (`gpt2`, `llama`, `qwen2_moe`, ...: the keys of
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES); a sequence-classification head is `<type>:seqcls`. `run_arch(name)` is the
per-architecture function (tests/test_hf_sweep.py runs it in-process on a fixed subset).

The batch: B = 3 samples of T = 8 random tokens, no padding (CausalLMLoss(model)(input_ids): transformers builds
its own causal mask). The loss: dpcompile.hf.CausalLMLoss (mean over samples of each sample's token mean),
loss_reduction="mean"; sequence classifiers: dpcompile.hf.SequenceClassificationLoss, and for the heads it refuses
(BERT, RoBERTa) a per-sample cross-entropy over the head's own logits, as docs/huggingface.md tells users to write.
"""
from __future__ import annotations

import argparse
import collections
import copy
import inspect
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import dpcompile  # noqa: E402
from dpcompile import errors as dp_errors  # noqa: E402
from dpcompile.hf import CausalLMLoss, SequenceClassificationLoss, UnsupportedHeadError  # noqa: E402
from dpcompile.testing.oracle import clipped_sum, default_groups, default_thresholds, per_sample_grads_loop  # noqa

B, T = 3, 8
VOCAB = 128
C_SMALL, C_LARGE = 1e-3, 1e4  # every sample clipped / no sample clipped
SEQCLS = ("gpt2", "llama", "bert", "roberta")
SEQCLS_SUFFIX = ":seqcls"
NUM_LABELS = 3

# ---- tiny configs -------------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN, MOE_FFN, POSITIONS = 32, 4, 2, 8, 2, 64, 32, 64
# every size field found generically, by name: value (applied only where the config has that field)
SIZES: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "hidden_dim", "model_dim",
                     "word_embed_proj_dim", "embedding_size", "d_embed"), HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers",
                     "decoder_layers", "encoder_layers", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "num_attn_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                     "num_key_value_groups", "n_head_kv"), KV_HEADS),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "attention_head_size", "d_head",
                     "d_kv"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "d_ff", "inner_hidden_size", "mlp_dim", "d_inner", "dense_intermediate_size",
                     "block_ffn_dim", "ff_dim"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "shared_intermediate_size", "moe_dim", "expert_dim"), MOE_FFN),
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx",
                     "seq_length", "max_seq_length", "original_max_position_embeddings"), POSITIONS),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts", "n_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "top_k",
                     "num_selected_experts", "experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "topk_groups"), 1),
    "rotary_dim": HEAD_DIM, "kv_n_heads": KV_HEADS,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state", "d_state"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), 16),
    **dict.fromkeys(("n_groups", "mamba_n_groups", "ngroups"), 1), "mamba_d_ssm": 2 * HIDDEN,
    **dict.fromkeys(("linear_num_key_heads",), 2), **dict.fromkeys(("linear_num_value_heads",), 4),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim"), 8),
    **dict.fromkeys(("router_jitter_noise", "jitter_noise", "input_jitter_noise", "router_z_loss_coef"), 0.0),
}
# fields that only shrink (a default of 1 KV head stays 1; an optional LoRA rank left None stays None)
SHRINK_ONLY = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "num_key_value_groups",
               "n_head_kv", "q_lora_rank", "n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
               "num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "top_k", "n_group",
               "topk_group", "num_expert_group", "topk_groups", "first_k_dense_replace", "rotary_dim"}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
             "sep_token_id": 3, "cls_token_id": 4, "mask_token_id": 5, "unk_token_id": 6, "image_token_id": 7,
             "video_token_id": 8, "audio_token_id": 9, "image_token_index": 7, "boi_token_id": 10,
             "eoi_token_id": 11}


def _is_dropout(key: str) -> bool:
    return any(s in key for s in ("dropout", "pdrop", "drop_path", "layerdrop", "drop_rate"))


LAYER_KEYS = {k for k, v in SIZES.items() if v is LAYERS and "layer" in k}


def _overrides(cls, defaults: dict, layers: int = LAYERS) -> dict:
    """The tiny values for the fields of a config class whose default values are `defaults`."""
    out: dict[str, Any] = {}
    for key, default in defaults.items():
        if key in SIZES:
            value = layers if key in LAYER_KEYS else SIZES[key]
            if isinstance(default, bool) or default is None and key in SHRINK_ONLY:
                continue
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if key in SHRINK_ONLY and default <= value:
                    continue
                out[key] = type(default)(value) if isinstance(default, float) and isinstance(value, int) else value
            elif default is None:
                out[key] = value
        elif key == "first_k_dense_replace" and isinstance(default, int):
            out[key] = min(default, 1)
        elif _is_dropout(key) and isinstance(default, (int, float)) and not isinstance(default, bool):
            out[key] = 0.0
        elif key in TOKEN_IDS:
            if isinstance(default, int) and default >= VOCAB:
                out[key] = TOKEN_IDS[key]
            elif isinstance(default, list) and any(isinstance(v, int) and v >= VOCAB for v in default):
                out[key] = TOKEN_IDS[key]
        elif key == "layer_types" and isinstance(default, list) and len(default) > layers:
            out[key] = default[:layers]
        elif key in ("expand", "mamba_expand") and isinstance(default, int) and default > 2:
            out[key] = 2
    if {"expand", "num_heads", "head_dim"} <= set(defaults):  # Mamba-2: heads x head_dim = expand x hidden
        out["expand"] = HEADS * HEAD_DIM // HIDDEN
    if "kv_lora_rank" in defaults:  # multi-head latent attention: as many KV heads as query heads
        for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
            if key in defaults:
                out[key] = HEADS
    return out


def _config_fields(cls) -> tuple[dict, bool]:
    """({field: default value}, whether the constructor takes **kwargs) of a config class."""
    try:
        defaults = cls().to_dict()
    except Exception:  # noqa: BLE001 (a config that needs arguments)
        defaults = {}
    params = inspect.signature(cls.__init__).parameters
    for name, p in params.items():
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in defaults:
            defaults[name] = None if p.default is inspect.Parameter.empty else p.default
    return defaults, any(p.kind == p.VAR_KEYWORD for p in params.values())


def tiny_config(config_cls, layers: int = LAYERS, **extra):
    """An instance of `config_cls` with every size field it has made tiny (SIZES), no dropout, token ids inside
    the vocabulary; sub-configs (text_config, vision_config, ...) shrunk the same way."""
    from transformers import PretrainedConfig

    defaults, _ = _config_fields(config_cls)
    kwargs = _overrides(config_cls, defaults, layers)
    for key, value in defaults.items():  # sub-configs, as dicts the constructor turns into configs
        if isinstance(value, dict) and "model_type" in value:
            sub_cls = _sub_config_class(config_cls, key, value)
            if sub_cls is not None:
                kwargs[key] = tiny_config(sub_cls, layers).to_dict()
    kwargs.update(extra)
    try:
        cfg = config_cls(**kwargs)
    except Exception:  # noqa: BLE001 (some field combination it rejects: keep the defaults, set what it takes)
        cfg = config_cls(**extra)
        for key, value in kwargs.items():
            if key not in extra and not isinstance(value, dict):
                try:
                    setattr(cfg, key, value)
                except Exception:  # noqa: BLE001
                    pass
    for key in list(vars(cfg)):
        value = getattr(cfg, key, None)
        if isinstance(value, PretrainedConfig) and key not in kwargs:
            setattr(cfg, key, tiny_config(type(value), layers))
    return cfg


def _sub_config_class(config_cls, key, value):
    subs = getattr(config_cls, "sub_configs", None) or {}
    if key in subs and isinstance(subs[key], type) and subs[key].__name__ != "AutoConfig":
        return subs[key]
    try:
        from transformers import AutoConfig
        return type(AutoConfig.for_model(value["model_type"]))
    except Exception:  # noqa: BLE001
        return None


# ---- the architectures --------------------------------------------------------------------------------------------


def causal_lm_names() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def all_names() -> list[str]:
    return causal_lm_names() + [n + SEQCLS_SUFFIX for n in SEQCLS]


def _model_class(name: str):
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if name.endswith(SEQCLS_SUFFIX):
        cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[name[:-len(SEQCLS_SUFFIX)]]
    else:
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name]
    if isinstance(cls_name, (tuple, list)):
        cls_name = cls_name[0]
    return getattr(transformers, cls_name)


def build(name: str, seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """The tiny model `name` (a transformers model type, `<type>:seqcls` for its sequence classifier), float32,
    train mode, seeded."""
    from transformers import AutoConfig

    model_type = name[:-len(SEQCLS_SUFFIX)] if name.endswith(SEQCLS_SUFFIX) else name
    cls = _model_class(name)
    config_cls = getattr(cls, "config_class", None) or type(AutoConfig.for_model(model_type))
    extra = {"num_labels": NUM_LABELS} if name.endswith(SEQCLS_SUFFIX) else {}
    cfg = tiny_config(config_cls, layers, **extra)
    if name.endswith(SEQCLS_SUFFIX) and getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0
    if not name.endswith(SEQCLS_SUFFIX) and getattr(cfg, "is_decoder", None) is False:
        cfg.is_decoder = True  # a causal LM head on an encoder-style config (BertLMHeadModel, Reformer) asks for it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.float().train()


class PerSampleClassificationLoss(nn.Module):
    """A head's own logits (B, num_labels), then each sample's cross-entropy, then their mean: what
    docs/huggingface.md tells users to write for a head SequenceClassificationLoss refuses (BERT, RoBERTa)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.model(input_ids=input_ids).logits
        return F.cross_entropy(logits, labels, reduction="none").mean()


def loss_module(name: str, model: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The per-sample loss module dpcompile trains `model` with, and a note when it is not dpcompile's own."""
    if not name.endswith(SEQCLS_SUFFIX):
        return CausalLMLoss(model), None
    try:
        return SequenceClassificationLoss(model), None
    except UnsupportedHeadError as exc:
        return PerSampleClassificationLoss(model), (
            f"SequenceClassificationLoss refuses it (UnsupportedHeadError: {_first_line(exc)[:120]}...); trained "
            "through a per-sample cross-entropy over the head's logits")


def batch(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, VOCAB, (B, T), generator=g)  # above every special token id
    if name.endswith(SEQCLS_SUFFIX):
        return ids, None, torch.randint(0, NUM_LABELS, (B,), generator=g)
    return (ids,)


def _oracle_loss(m, *sample):
    return m(*sample)


def _seqcls_oracle_loss(m, ids, labels):
    return m(ids, None, labels)


# ---- verdicts -----------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    """The message's first line, a long list of parameter names shortened to its count and first name."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__

    def short(m):
        names = re.findall(r"'([^']*)'", m.group(0))
        return f"[{len(names)} names: {names[0]}, ...]" if len(names) > 2 else m.group(0)

    return re.sub(r"\['[^']*'(?:, '[^']*')*\]", short, line)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__


def dp_refusal(exc: BaseException) -> Optional[BaseException]:
    """dpcompile's own error in exc's chain of causes (Dynamo wraps backend errors), or None."""
    for e in _chain(exc):
        if isinstance(e, (dp_errors.DPCompileError, UnsupportedHeadError)):
            return e
    return None


_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _frames(exc: BaseException) -> dict:
    """The innermost frame of the traceback, and the innermost frame of model code (transformers) named in
    Dynamo's "from user code" trace, when there is one."""
    out = {}
    tb = traceback.extract_tb(exc.__traceback__)
    for e in _chain(exc):
        tb = traceback.extract_tb(e.__traceback__) or tb
    if tb:
        f = tb[-1]
        out["frame"] = f"{_short(f.filename)}:{f.lineno} in {f.name}"
    for e in _chain(exc):
        user = [m for m in _USER_FRAME.finditer(str(e)) if "transformers" in m.group(1) or "dpcompile" in m.group(1)]
        if user:
            m = user[-1]
            out["user_frame"] = f"{_short(m.group(1))}:{m.group(2)} in {m.group(3)}"
            break
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _error(exc: BaseException) -> dict:
    return {"error_type": type(exc).__name__, "error": _first_line(exc)[:500], **_frames(exc)}


def _crash_summary(exc: BaseException) -> dict:
    # the innermost non-wrapper error says more than BackendCompilerFailed / InternalTorchDynamoError
    inner = list(_chain(exc))[-1]
    out = _error(exc)
    if inner is not exc:
        out["cause_type"] = type(inner).__name__
        out["cause"] = _first_line(inner)[:500]
    return out


def compare(model: nn.Module, want: dict, eager_none: set) -> dict:
    """Worst parameter: {"ok", "param", "abs_err", "rel_err", "notes"}; `want` is the float64 clipped sum."""
    scale = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
    worst = {"ok": True, "param": None, "abs_err": 0.0, "rel_err": 0.0}
    notes = []
    zeros_for_unused = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        w = want[n]
        if p.grad is None:
            if n in eager_none and not w.abs().max().item() > 0:
                continue  # unused by the forward: None, as in eager PyTorch
            return {"ok": False, "param": n, "abs_err": float(w.abs().max()), "rel_err": 1.0,
                    "notes": [f"{n}: no gradient (.grad is None) where eager has one"]}
        g = p.grad.detach().double()
        if n in eager_none:
            zeros_for_unused.append(n)
        err = (g - w).abs().max().item() if w.numel() else 0.0
        wmax = w.abs().max().item() if w.numel() else 0.0
        rel = err / wmax if wmax > 0 else (0.0 if err == 0 else math.inf)
        ok = bool(torch.allclose(g, w, rtol=1e-3, atol=1e-4 * wmax + 1e-6 * scale))
        if not math.isfinite(err):
            ok = False
        if (not ok, rel) > (not worst["ok"], worst["rel_err"]):
            worst = {"ok": ok, "param": n, "abs_err": err, "rel_err": rel}
    if zeros_for_unused:
        notes.append(f"{len(zeros_for_unused)} parameters the forward never uses get a zero .grad (eager leaves "
                     f"None): {', '.join(zeros_for_unused[:3])}{', ...' if len(zeros_for_unused) > 3 else ''}")
    worst["notes"] = notes
    return worst


def run_arch(name: str, *, clipping: str = "per_layer", Cs=(C_SMALL, C_LARGE), backend: str = "flashdp_eager",
             seed: int = 0, layers: int = LAYERS) -> dict:
    """One architecture's verdict (see the module docstring), as a JSON-able dict. In-process; never raises."""
    t0 = time.time()
    rec: dict[str, Any] = {"name": name, "kind": "seqcls" if name.endswith(SEQCLS_SUFFIX) else "causal_lm"}
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        rec["class"] = _model_class(name).__name__
        model = build(name, seed, layers)
        rec["params"] = sum(p.numel() for p in model.parameters())
        wrapper, note = loss_module(name, model)
        if note:
            rec["note"] = note
        args = batch(name, seed)
        # eager: one training step, and the same loss again (train mode must be deterministic for the oracle)
        loss = wrapper(*args)
        loss.backward()
        eager_none = {n for n, p in wrapper.named_parameters() if p.requires_grad and p.grad is None}
        with torch.no_grad():
            again = wrapper(*args)
        if not torch.equal(loss.detach(), again):
            wrapper.eval()  # train-mode randomness left in the model (a stochastic layer the config did not reach)
            rec.setdefault("notes", []).append("train mode is not deterministic; checked in eval mode")
        wrapper.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"eager loss is {loss.item()}")
        rec["eager_loss"] = loss.item()
        rec["unused_params"] = len(eager_none)
        oracle_loss = _seqcls_oracle_loss if rec["kind"] == "seqcls" else _oracle_loss
        oracle_args = (args[0], args[2]) if rec["kind"] == "seqcls" else args
        try:
            per_sample = per_sample_grads_loop(wrapper, oracle_loss, oracle_args, dtype=torch.float64)
        except Exception as exc:  # noqa: BLE001 (a model that does not run in float64: a float32 oracle)
            rec.setdefault("notes", []).append(f"float64 oracle failed ({type(exc).__name__}); float32 oracle")
            per_sample = {n: g.double() for n, g in
                          per_sample_grads_loop(wrapper, oracle_loss, oracle_args, dtype=torch.float32).items()}
    except Exception as exc:  # noqa: BLE001
        rec.update(verdict="no_eager", **_error(exc), seconds=round(time.time() - t0, 1))
        return rec
    rec["checks"] = []
    verdict = "exact"
    for C in Cs:
        groups = default_groups(wrapper, clipping)
        want = clipped_sum(per_sample, groups, default_thresholds(C, len(groups)), "abadi")
        wrapper.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        try:
            dp = dpcompile.compile(wrapper, backend=backend, max_grad_norm=C, clipping=clipping,
                                   loss_reduction="mean")
            out = dp(*args)
            out.backward()
        except Exception as exc:  # noqa: BLE001
            refusal = dp_refusal(exc)
            if refusal is not None:
                rec.update(verdict="refused", error_type=type(refusal).__name__, error=_first_line(refusal)[:1000],
                           C=C, **{k: v for k, v in _frames(exc).items() if k == "user_frame"})
            else:
                rec.update(verdict="crash", C=C, **_crash_summary(exc))
            rec["seconds"] = round(time.time() - t0, 1)
            torch._dynamo.reset()
            return rec
        cmp = compare(wrapper, want, eager_none)
        rec["checks"].append({"C": C, "ok": cmp["ok"], "param": cmp["param"], "abs_err": cmp["abs_err"],
                              "rel_err": cmp["rel_err"]})
        for n in cmp.get("notes", []):
            if n not in rec.get("notes", []):
                rec.setdefault("notes", []).append(n)
        if not cmp["ok"]:
            verdict = "mismatch"
            rec.update(param=cmp["param"], abs_err=cmp["abs_err"], rel_err=cmp["rel_err"], C=C)
            break
    torch._dynamo.reset()
    rec["verdict"] = verdict
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


# ---- the sweep: one forked process per architecture ---------------------------------------------------------------


def _child(name: str, conn, kwargs: dict) -> None:
    torch.set_num_threads(1)
    try:
        rec = run_arch(name, **kwargs)
    except BaseException as exc:  # noqa: BLE001
        rec = {"name": name, "verdict": "crash", **_error(exc)}
    conn.send(json.dumps(rec, default=str))
    conn.close()


def run_isolated(name: str, timeout: float, **kwargs) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.time()
    proc = ctx.Process(target=_child, args=(name, send, kwargs), daemon=True)
    proc.start()
    send.close()
    rec = None
    if recv.poll(timeout):
        try:
            rec = json.loads(recv.recv())
        except EOFError:
            rec = None
    proc.join(5 if rec is not None else 0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rec is None:
        if time.time() - t0 >= timeout:
            rec = {"name": name, "verdict": "timeout", "error": f"no verdict within {timeout:.0f} s"}
        else:
            rec = {"name": name, "verdict": "died", "error": f"process exit code {proc.exitcode}"}
        rec["kind"] = "seqcls" if name.endswith(SEQCLS_SUFFIX) else "causal_lm"
        rec["seconds"] = round(time.time() - t0, 1)
    return rec


# ---- summary ------------------------------------------------------------------------------------------------------

VERDICTS = ("exact", "mismatch", "refused", "crash", "timeout", "died", "no_eager")
_OP = re.compile(r"\baten\.([A-Za-z_0-9]+)|\b([a-z_0-9]+)\.(?:default|Tensor|Scalar|int|dim|self|Tensor_mode)\b")


def refusal_cause(rec: dict) -> str:
    """A refusal's class and the op it blames (the parameter paths and numbers left out), to group refusals: the
    last op its message names (the one that combines samples, or whose rule failed), "MoE routing" when that op
    is in an experts module."""
    msg = rec.get("error", "")
    kind = rec.get("error_type")
    if kind == "CoverageError" and rec.get("unused_params"):
        return "CoverageError: trainable parameters the forward never uses (eager PyTorch leaves their .grad None)"
    ops = re.findall(r"op `([^`]+)`(?: \(([^)]+)\))?", msg)
    if ops:
        name, desc = ops[-1]
        op = (desc.split()[0] if desc else name)
        op = re.sub(r"_[0-9]+$", "", op.split(".")[0])
        where = ""
        module = re.findall(r"op `[^`]+`(?: \([^)]+\))? in (\w+)", msg)
        if module and re.search(r"(Experts|Expert|Moe|MoE|Router|Gating|TopK|Gate)(Block|Layer|Module)?$", module[-1]):
            where = " (mixture-of-experts routing)"
        elif "batch-dim rule failed" in msg:
            inner = re.search(r"batch-dim rule failed \(([A-Za-z]+Error)", msg)
            where = f" (its batch-dim rule raised {inner.group(1) if inner else 'an error'})"
        return f"{kind}: {op}{where}"
    m = _OP.search(msg)
    if m:
        return f"{kind}: {m.group(1) or m.group(2)}"
    return f"{kind}: {re.sub(r'[0-9]+', 'N', msg)[:90]}"


def summarize(records: list[dict]) -> str:
    counts = collections.Counter(r["verdict"] for r in records)
    ran = [r for r in records if r["verdict"] != "no_eager"]
    exact = counts["exact"]
    lines = ["", "=== hf_sweep summary ===", f"architectures: {len(records)}"]
    for v in VERDICTS:
        lines.append(f"  {v:<9} {counts[v]:>4}")
    if ran:
        lines.append(f"run without dpcompile: {len(ran)}; exact: {exact}/{len(ran)} = {100 * exact / len(ran):.1f}%")
    for v in ("mismatch", "crash", "timeout", "died"):
        rs = [r for r in records if r["verdict"] == v]
        if rs:
            lines.append(f"{v}:")
            for r in rs:
                if v == "mismatch":
                    lines.append(f"  {r['name']}: {r.get('param')} rel err {r.get('rel_err'):.3g} "
                                 f"(abs {r.get('abs_err'):.3g}) at C={r.get('C')}")
                else:
                    where = r.get("user_frame") or r.get("frame", "")
                    cause = f" <- {r['cause_type']}: {r['cause'][:100]}" if r.get("cause") else ""
                    lines.append(f"  {r['name']}: {r.get('error_type', '')}: {r.get('error', '')[:140]}{cause} "
                                 f"[{where}]")
    refused = [r for r in records if r["verdict"] == "refused"]
    if refused:
        lines.append("refused, by cause:")
        by = collections.defaultdict(list)
        for r in refused:
            by[refusal_cause(r)].append(r["name"])
        for cause, names in sorted(by.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(names):>3}  {cause}: {', '.join(names)}")
    no_eager = [r for r in records if r["verdict"] == "no_eager"]
    if no_eager:
        lines.append("does not run without dpcompile (tiny config, eager step or oracle):")
        by = collections.defaultdict(list)
        for r in no_eager:
            by[r.get("error_type", "?")].append(r["name"])
        for cause, names in sorted(by.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(names):>3}  {cause}: {', '.join(names)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="comma-separated model types (`gpt2`, `llama:seqcls`, ...)")
    ap.add_argument("--skip", help="comma-separated model types to leave out")
    ap.add_argument("--jobs", type=int, default=1, help="architectures at a time (1: one process at a time)")
    ap.add_argument("--out", help="append one JSON line per architecture to this file")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per architecture (default 60)")
    ap.add_argument("--clipping", default="per_layer", choices=("flat", "per_layer", "per_param"))
    ap.add_argument("--resume", action="store_true", help="skip the architectures already in --out")
    ap.add_argument("--merge-into", metavar="JSONL",
                    help="after the run, replace these architectures' records in JSONL (a full sweep's file; new ones "
                         "are appended), e.g. to re-measure a subset")
    ap.add_argument("--summary", metavar="JSONL", help="print the summary of a past run and exit")
    ap.add_argument("--list", action="store_true", help="print the architectures and exit")
    a = ap.parse_args(argv)
    if a.summary:
        with open(a.summary) as f:
            print(summarize([json.loads(line) for line in f if line.strip()]))
        return 0
    names = all_names()
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
    if a.skip:
        skip = {n.strip() for n in a.skip.split(",")}
        names = [n for n in names if n not in skip]
    if a.list:
        print("\n".join(names))
        return 0
    done: dict[str, dict] = {}
    if a.resume and a.out and os.path.exists(a.out):
        with open(a.out) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["name"]] = r
    records = [done[n] for n in names if n in done]
    todo = [n for n in names if n not in done]
    out = open(a.out, "a") if a.out else None
    t0 = time.time()
    try:
        if a.jobs <= 1:
            results = (run_isolated(n, a.timeout, clipping=a.clipping) for n in todo)
        else:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(a.jobs)
            results = pool.map(lambda n: run_isolated(n, a.timeout, clipping=a.clipping), todo)
        for i, rec in enumerate(results, 1):
            records.append(rec)
            if out:
                out.write(json.dumps(rec, default=str) + "\n")
                out.flush()
            detail = ""
            if rec["verdict"] == "mismatch":
                detail = f"{rec.get('param')} rel err {rec.get('rel_err'):.3g} at C={rec.get('C')}"
            elif rec["verdict"] != "exact":
                detail = f"{rec.get('error_type', '')}: {rec.get('error', '')[:110]}"
            print(f"[{i}/{len(todo)} {time.time() - t0:6.0f}s] {rec['name']:<28} {rec['verdict']:<9} "
                  f"{rec.get('seconds', 0):5.1f}s {detail}", flush=True)
    finally:
        if out:
            out.close()
    print(summarize(records), flush=True)
    if a.merge_into:
        merge_records(a.merge_into, records)
    return 0


def merge_records(path: str, records: list[dict]) -> None:
    """Replace the records of the same architectures in the JSONL file `path` (keeping its order), append the
    others."""
    new = {r["name"]: r for r in records}
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out.append(new.pop(r["name"], r))
    out.extend(new.values())
    with open(path, "w") as f:
        for r in out:
            f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
