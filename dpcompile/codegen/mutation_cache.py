"""Memoized mutation analysis of user Triton kernels, for Inductor's compile time.

Inductor learns which arguments a user-defined Triton kernel writes by compiling the kernel to TTIR and walking
it (torch._higher_order_ops.triton_kernel_wrap: identify_mutated_tensors in torch 2.11, identify_accessed_tensors
later). It does so for every call site, and several times per site (functionalization, lowering, the scheduler).
A DP graph calls the same few kernels at every parameter (gpt2-small: about a hundred call sites), so the same
analysis of the same specialization repeats hundreds of times in the backward's compile.

The analysis is a function of the kernel and of what torch's generate_ttir turns the arguments into: each fake
tensor becomes a 2-element tensor of its dtype, each symbolic size the integer 2, every other argument stays as
it is. That is the key here; an argument of any other kind (a real tensor, a TMA descriptor, an IR node) makes
the call bypass the cache. Results are names of the kernel's formal arguments, copied out on every hit.

Off by default until a GPU has checked it (tests/test_gpu.py test_memoized_kernel_analysis_matches_torchs, and
benchmarks/device_issue21.sh phases for the compile time; benchmarks/NOTES.md entry 30): DPCOMPILE_MUTATION_CACHE=1
turns it on, 0 or unset leaves torch's analysis as it is.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable, Optional

import torch

#: the analysis functions of the torch versions we support; whichever exist are wrapped
ANALYSES = ("identify_mutated_tensors", "identify_accessed_tensors")
_BYPASS = object()


def _token(value: Any):
    """What generate_ttir makes of one argument, as a hashable token (or _BYPASS)."""
    import sympy

    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, torch.Tensor):
        return _BYPASS  # a real tensor: its address's alignment may specialize the kernel
    try:
        from torch._inductor.ir import TensorBox

        if isinstance(value, TensorBox):
            return ("tensor", value.get_dtype())
    except ImportError:  # pragma: no cover - Inductor is part of torch
        pass
    if isinstance(value, (bool, int, float, str, torch.dtype)) or value is None:
        return (type(value), value)
    return _BYPASS  # anything else (an IR node, a descriptor) is not worth the risk of a wrong key


def analysis_key(kernel: Any, kwargs: dict, tma_descriptor_metadata: Any) -> Optional[tuple]:
    """The cache key of one analysis call, or None when the call must run (see the module docstring)."""
    if tma_descriptor_metadata:
        return None
    tokens = []
    for name in sorted(kwargs):
        token = _token(kwargs[name])
        if token is _BYPASS:
            return None
        tokens.append((name, token))
    return (id(kernel), tuple(tokens))


def memoized(analysis: Callable) -> Callable:
    """`analysis(kernel, kwargs, tma_descriptor_metadata=...)` with its results kept per analysis_key."""
    cache: dict = {}
    kernels: dict = {}  # id -> kernel: keeps each keyed kernel alive, so that its id is never reused

    @functools.wraps(analysis)
    def wrapper(kernel, kwargs, *args, **kw):
        tma = args[0] if args else kw.get("tma_descriptor_metadata")
        key = analysis_key(kernel, kwargs, tma)
        if key is None:
            return analysis(kernel, kwargs, *args, **kw)
        if key not in cache:
            cache[key] = analysis(kernel, kwargs, *args, **kw)
            kernels[id(kernel)] = kernel
        return copy.deepcopy(cache[key])

    wrapper.dp_mutation_cache = cache
    return wrapper


def enabled() -> bool:
    return os.environ.get("DPCOMPILE_MUTATION_CACHE", "0") == "1"


def install(force: bool = False) -> None:
    """Wrap torch's analysis functions once per process, if enabled() or force."""
    if not (force or enabled()):
        return
    import torch._inductor.graph
    import torch._inductor.ir
    import torch._inductor.lowering
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    for name in ANALYSES:
        fn = getattr(wrap, name, None)
        if fn is None or hasattr(fn, "dp_mutation_cache"):
            continue
        cached = memoized(fn)
        setattr(wrap, name, cached)
        for module in (torch._inductor.ir, torch._inductor.graph, torch._inductor.lowering):
            if getattr(module, name, None) is fn:  # imported by name at module level: rebind there too
                setattr(module, name, cached)
