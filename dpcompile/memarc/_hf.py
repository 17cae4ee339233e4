"""What the transformations need to know about a Hugging Face causal LM: its family, decoder layers, widths, and
which of its linear layers are the attention / MLP projections.

Supported families: GPT-2 (`GPT2LMHeadModel`: `transformer.h`, transformers' `Conv1D` projections, LayerNorm) and
Llama-style models (`LlamaForCausalLM` and its relatives with `model.layers`, `self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, RMSNorm: Llama, Mistral, Qwen2, SmolLM2, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import DPCompileError


def is_linear_like(m: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2: x @ W + b with W of shape (in, out))."""
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.nx, m.nf


@dataclass(frozen=True)
class Family:
    name: str  # "gpt2" | "llama"
    layers_attr: str  # ModuleList of decoder layers inside the base model
    attn: tuple  # attention projections (relative to a decoder layer)
    mlp: tuple  # MLP projections
    attn_out: str  # attention output projection (adapters go after it)
    mlp_out: str  # MLP output projection
    norm: str  # "layernorm" | "rmsnorm"


GPT2 = Family("gpt2", "h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"), "attn.c_proj", "mlp.c_proj",
              "layernorm")
LLAMA = Family("llama", "layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "self_attn.o_proj", "mlp.down_proj", "rmsnorm")


def family_of(lm: nn.Module) -> Family:
    base = getattr(lm, "base_model", None)
    if base is None or getattr(lm, "config", None) is None:
        raise DPCompileError(f"dpcompile.memarc: {type(lm).__name__} is not a Hugging Face causal LM "
                             "(no .base_model / .config)")
    if isinstance(getattr(base, "h", None), nn.ModuleList) and hasattr(base, "wte"):
        return GPT2
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn") \
            and hasattr(layers[0], "mlp"):
        return LLAMA
    raise DPCompileError(f"dpcompile.memarc: unsupported model family {type(lm).__name__} "
                         f"(model_type={getattr(lm.config, 'model_type', None)!r}); supported: GPT-2 and Llama-style")


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    return getattr(lm.base_model, family_of(lm).layers_attr)


def hidden_size(lm: nn.Module) -> int:
    return int(lm.config.hidden_size)


def num_heads(lm: nn.Module) -> int:
    return int(lm.config.num_attention_heads)


def output_head(lm: nn.Module) -> nn.Module:
    head = lm.get_output_embeddings()
    if head is None:
        raise DPCompileError(f"dpcompile.memarc: {type(lm).__name__} has no output embeddings (LM head)")
    return head


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def projection_paths(lm: nn.Module, targets) -> list[str]:
    """Full module paths of the projections named by `targets` in every decoder layer.

    targets: "attn" (attention projections), "mlp", "all", or a list of paths relative to a decoder layer
    (e.g. ["attn.c_attn"] for GPT-2 or ["self_attn.q_proj", "self_attn.v_proj"] for Llama)."""
    fam = family_of(lm)
    if isinstance(targets, str):
        rel = {"attn": fam.attn, "mlp": fam.mlp, "all": fam.attn + fam.mlp}.get(targets)
        if rel is None:
            raise DPCompileError(f"dpcompile.memarc: targets={targets!r}; use 'attn', 'mlp', 'all' or a list of "
                                 f"projection names such as {list(fam.attn)}")
    else:
        rel = tuple(targets)
    prefix = f"{lm.base_model_prefix}.{fam.layers_attr}"
    paths = []
    for i, layer in enumerate(decoder_layers(lm)):
        for r in rel:
            try:
                m = layer.get_submodule(r)
            except AttributeError:
                raise DPCompileError(f"dpcompile.memarc: decoder layer {i} has no module {r!r}") from None
            if not is_linear_like(m):
                raise DPCompileError(f"dpcompile.memarc: {r!r} in layer {i} is a {type(m).__name__}, "
                                     "not a linear layer")
            paths.append(f"{prefix}.{i}.{r}")
    return paths
