"""Sizes read for choices that are exact either way, shared by the custom ops (ops.py) and their Triton kernels
(kernels/): a module of its own, so that neither imports the other for it."""
from __future__ import annotations

import torch


def size_hint(n, fallback: int = 8) -> int:
    """A size as an int for a choice that is exact either way (which of two equal formulas runs, a launch
    parameter): a symbolic size's hint (its value at the compiling call), read without adding a guard. A guard here
    would make the compiled graph specialize on the sequence length (a graph per range of T)."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if isinstance(hint, int) else fallback
    return int(n)
