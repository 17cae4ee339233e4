"""One Triton front-end run per distinct launch of our kernels while a model compiles (issue 21 item 5).

To learn which arguments a user Triton launch reads and writes, torch generates the kernel's TTIR (Triton's whole
front end: AST walk, type inference, MLIR) for every launch it meets, at every stage that asks: the inline stage's
functionalization, Inductor's graph lowering and its IR node. A DP graph of gpt2-small holds ~130 launches of a
dozen distinct kernels-with-constants, and the GPU profile of its compile spent ~20 s in Triton's front end
(benchmarks/NOTES.md 39), none of it in a non-DP compile.

torch's `generate_ttir(kernel, kwargs, tma_descriptor_metadata)` first reduces its arguments to what the front end
sees: every fake tensor (or Inductor TensorBox) becomes a 2-element tensor of its dtype, every symbolic size the
number 2, everything else is passed as it is (constexprs, ints, floats, None, real tensors). The key here is exactly
that reduction (plus the kernel object and its source hash), so two launches with equal keys run the front end on
equal inputs: the first one's module is returned for the second. A launch with an argument of another kind (a real
tensor, whose address alignment Triton specializes on; TMA descriptors; anything not listed) runs the front end as
before. `DPCOMPILE_VERIFY_TRACE_CACHE=1` (the test suite) runs it anyway on every hit and refuses a module whose
text differs (and records it: torch's analysis swallows exceptions).
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, Optional

import sympy
import torch
from torch._inductor.ir import TensorBox
from torch._subclasses.fake_tensor import FakeTensor

from .passes.trace_cache import verify_enabled

log = logging.getLogger("dpcompile")

_lock = threading.Lock()
_modules: dict = {}
_stats = {"hits": 0, "misses": 0}
_mismatches: list = []  # verify mode: launches whose cached module differed from a fresh one


def _reduced(value: Any) -> Any:
    """What generate_ttir hands the Triton front end for one argument, as a hashable key part."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, TensorBox):  # Inductor's lowering: a tensor of its dtype
        return ("tensor", value.get_dtype())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, repr(value))
    # a real tensor reaches Triton as it is (its address's alignment counts); anything else: not a kind keyed here
    raise TypeError(type(value).__name__)


def key_of(kernel: Any, kwargs: dict, tma_descriptor_metadata: Any) -> Optional[tuple]:
    """The launch's key, or None where an argument is of a kind the key does not cover."""
    if tma_descriptor_metadata:  # descriptors carry shapes the reduction keeps: not keyed
        return None
    fn = getattr(kernel, "fn", kernel)  # an Autotuner's JITFunction: its source hash, in case it was redefined
    try:
        return (id(kernel), getattr(fn, "cache_key", None),
                tuple(sorted((name, _reduced(v)) for name, v in kwargs.items())))
    except TypeError:
        return None


def cached(generate: Callable) -> Callable:
    """generate_ttir with the memo above. An entry holds its kernel, so the kernel's id in the key is never reused
    by another object."""

    @functools.wraps(generate)
    def generate_ttir(kernel, kwargs, *args, **kw):
        # the memo knows the call (kernel, kwargs, tma_descriptor_metadata); any other form of it (another torch's
        # signature) runs the front end as torch would
        key = None
        if len(args) == 1 and not kw:
            key = key_of(kernel, kwargs, args[0])
        elif not args and set(kw) == {"tma_descriptor_metadata"}:
            key = key_of(kernel, kwargs, kw["tma_descriptor_metadata"])
        if key is None:
            return generate(kernel, kwargs, *args, **kw)
        with _lock:
            hit = _modules.get(key)
            _stats["hits" if hit is not None else "misses"] += 1
        if hit is not None:
            if verify_enabled():
                fresh, names = generate(kernel, dict(kwargs), *args, **kw)
                if str(fresh) != str(hit[1]) or list(names) != list(hit[2]):
                    # torch's analysis turns any exception into "every input is mutated": recorded, so that the
                    # test suite's check (tests/conftest.py) fails even where the raise is swallowed
                    what = f"kernel {getattr(kernel, '__name__', kernel)}"
                    _mismatches.append(what)
                    raise AssertionError(f"dpcompile TTIR cache: a launch's cached TTIR differs from a fresh one "
                                         f"({what})")
            return hit[1], list(hit[2])
        module, names = generate(kernel, kwargs, *args, **kw)
        with _lock:
            _modules[key] = (kernel, module, list(names))
        return module, list(names)

    generate_ttir.dpcompile_cached = True
    return generate_ttir


def install() -> None:
    """Route torch's user-kernel analysis through the memo (once per process; idempotent)."""
    from torch._higher_order_ops import triton_kernel_wrap

    current = getattr(triton_kernel_wrap, "generate_ttir", None)
    if current is None or getattr(current, "dpcompile_cached", False):
        return
    triton_kernel_wrap.generate_ttir = cached(current)


def stats() -> dict:
    return dict(_stats)


def mismatches() -> list:
    return list(_mismatches)
