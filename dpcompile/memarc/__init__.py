"""dpcompile.memarc: memory-efficient DP fine-tuning of Hugging Face causal LMs (DP-MemArc and PEFT baselines).

Each transformation returns a `MemArcLM` whose forward is `model(input_ids, targets) -> per-sample mean loss` and
whose only trainable parameters are the new ones (the backbone is frozen). Train it through the flashdp backend:

    from dpcompile import memarc
    model = memarc.side_network(hf_lm, reduction=8)            # or reversible / lora / adapters / full
    dp_model = memarc.compile(model, clipping="per_layer", max_grad_norm=1.0)   # clipping: explicit, checked
    dp_model(input_ids, targets).backward()                    # .grad = sum of per-sample clipped gradients

See docs/memarc.md for the designs, what each keeps for backward, and which clipping styles cost what.
"""
from .model import IGNORE_INDEX, MemArcLM, compile, make_private, per_sample_lm_loss
from .peft import Adapter, AdapterLM, FullLM, LoRALinear, LoRALM, adapters, full, lora, merge_lora
from .reversible import RevCoupling, ReversibleLM, reversible
from .side import SideLM, SideNetwork, side_network

METHODS = {"full": full, "lora": lora, "adapters": adapters, "side": side_network, "reversible": reversible}

__all__ = [
    "MemArcLM", "compile", "make_private", "per_sample_lm_loss", "IGNORE_INDEX", "METHODS",
    "full", "lora", "adapters", "side_network", "reversible", "merge_lora",
    "FullLM", "LoRALM", "AdapterLM", "SideLM", "ReversibleLM", "LoRALinear", "Adapter", "RevCoupling", "SideNetwork",
]
