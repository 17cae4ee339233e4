"""ttir_cache.py: torch's user-kernel analysis runs Triton's front end once per distinct launch, and a launch
that would give other TTIR never gets a cached module."""
from __future__ import annotations

import pytest
import torch
from no_interpreter import last_json, run_script
from torch._subclasses.fake_tensor import FakeTensorMode

from dpcompile import ttir_cache


_fake = FakeTensorMode()


def _t(*shape, dtype=torch.float32):
    """A fake tensor: what torch's analysis meets while compiling (a real tensor is never keyed)."""
    with _fake:
        return torch.empty(*shape, dtype=dtype)


class _Kernel:
    """Stands in for a JITFunction (the memo only keys on the object and its source hash)."""

    def __init__(self, cache_key="src-1"):
        self.cache_key = cache_key


def _counting():
    calls = []

    def generate(kernel, kwargs, tma):
        calls.append(dict(kwargs))
        return f"module {len(calls)} of {sorted(kwargs)}", list(kwargs)

    return calls, generate


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    monkeypatch.setattr(ttir_cache, "_modules", {})
    monkeypatch.setattr(ttir_cache, "_stats", {"hits": 0, "misses": 0})
    monkeypatch.setattr(ttir_cache, "_mismatches", [])
    monkeypatch.delenv("DPCOMPILE_VERIFY_TRACE_CACHE", raising=False)


def test_launches_the_front_end_cannot_tell_apart_share_one_run():
    """Tensors reach the front end as their dtype only, symbolic sizes as 2: other shapes, other sizes, the same
    module."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    calls, generate = _counting()
    memo = ttir_cache.cached(generate)
    kernel = _Kernel()
    sym = ShapeEnv().create_unbacked_symint()
    first = memo(kernel, {"x": _t(4, 5), "n": sym, "BLOCK": 64}, {})
    second = memo(kernel, {"x": _t(7, 2), "n": sym + 3, "BLOCK": 64}, {})
    assert len(calls) == 1 and first == second and ttir_cache.stats() == {"hits": 1, "misses": 1}


@pytest.mark.parametrize("change", ["dtype", "constexpr", "int value", "None", "kernel", "source"])
def test_anything_the_front_end_reads_differently_runs_it_again(change):
    calls, generate = _counting()
    memo = ttir_cache.cached(generate)
    kernel = _Kernel()
    base = {"x": _t(4), "n": 16, "BLOCK": 64, "rest": _t(1)}
    other, other_kernel = dict(base), kernel
    if change == "dtype":
        other["x"] = _t(4, dtype=torch.bfloat16)
    elif change == "constexpr":
        other["BLOCK"] = 128
    elif change == "int value":  # Triton specializes ints on 1 and on divisibility by 16
        other["n"] = 1
    elif change == "None":
        other["rest"] = None
    elif change == "kernel":
        other_kernel = _Kernel()
    else:
        other_kernel = kernel
        kernel.cache_key = "src-1"
        memo(kernel, base, {})
        kernel.cache_key = "src-2"  # the same object, its source redefined
        memo(kernel, other, {})
        assert len(calls) == 2
        return
    memo(kernel, base, {})
    memo(other_kernel, other, {})
    assert len(calls) == 2


def test_arguments_outside_the_key_are_never_cached():
    calls, generate = _counting()
    memo = ttir_cache.cached(generate)
    kernel = _Kernel()
    for _ in range(2):
        memo(kernel, {"x": _t(2), "shape": [1, 2]}, {})  # a list: not a kind the key covers
        memo(kernel, {"x": _t(2)}, {"x": ("stable", ([64, 64],))})  # TMA descriptors
        memo(kernel, {"x": torch.empty(2)}, {})  # a real tensor: Triton specializes on its address's alignment
    assert len(calls) == 6 and ttir_cache.stats()["hits"] == 0


def test_verify_mode_refuses_a_cached_module_that_differs(monkeypatch):
    calls, generate = _counting()  # every run returns a new text: as if the key missed something
    memo = ttir_cache.cached(generate)
    kernel = _Kernel()
    memo(kernel, {"x": _t(2)}, {})
    monkeypatch.setenv("DPCOMPILE_VERIFY_TRACE_CACHE", "1")
    with pytest.raises(AssertionError, match="cached TTIR differs"):
        memo(kernel, {"x": _t(3)}, {})
    assert ttir_cache.mismatches() == ["kernel " + repr(kernel)]  # what conftest.py checks after every test


def test_install_is_idempotent(monkeypatch):
    from torch._higher_order_ops import triton_kernel_wrap

    monkeypatch.setattr(triton_kernel_wrap, "generate_ttir", triton_kernel_wrap.generate_ttir)
    ttir_cache.install()
    once = triton_kernel_wrap.generate_ttir
    ttir_cache.install()
    assert triton_kernel_wrap.generate_ttir is once and once.dpcompile_cached


_REAL_KERNELS = """
import json
import torch, triton
from triton.backends.compiler import GPUTarget

class _Target:  # no GPU here: the front end only needs a target to generate TTIR for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver._active = _Target()
from torch._higher_order_ops import triton_kernel_wrap as W
from torch._subclasses.fake_tensor import FakeTensorMode
from dpcompile import ttir_cache
from dpcompile.codegen.kernels import linear as K

ttir_cache.install()
with FakeTensorMode():
    a1, b1 = torch.empty(4, 5, 6), torch.empty(4, 5, 3)
    a2, b2 = torch.empty(8, 5, 6), torch.empty(8, 5, 3)
    h1, h2 = torch.empty(4, 5, 6, dtype=torch.bfloat16), torch.empty(4, 5, 3, dtype=torch.bfloat16)
    out = torch.empty(4, 1)

def launch(a, b, T, P):
    kwargs = dict(a_ptr=a, b_ptr=b, partial_ptr=out, T=T, M=6, N=3, sa_b=a.stride(0), sa_t=a.stride(1),
                  sa_m=a.stride(2), sb_b=b.stride(0), sb_t=b.stride(1), sb_n=b.stride(2), P=P, T_BUCKET=32,
                  IEEE=a.dtype == torch.float32, BLOCK_M=16, BLOCK_N=16, BLOCK_T=16)
    return W.identify_accessed_tensors(K._norm_kernel, kwargs, {})

first = launch(a1, b1, 5, 1)
second = launch(a2, b2, 5, 1)     # another batch (as in the next block), the same dtypes and ints: the same TTIR
third = launch(h1, h2, 5, 1)      # bf16: other TTIR
print(json.dumps({"stats": ttir_cache.stats(), "same": str(first) == str(second)}))
"""


def test_real_kernels_through_torchs_analysis():
    """torch's identify_accessed_tensors on one of our kernels, on fake tensors, with a CUDA target stubbed in (no
    GPU needed to generate TTIR), in verify mode: the second launch (another batch size) gets the cached module,
    equal to a fresh one; a bf16 launch runs the front end again. Ints are keyed by value (exact, if stricter
    than Triton's own specialization). In a process without the interpreter, whose kernels are not JITFunctions."""
    got = last_json(run_script(_REAL_KERNELS, verify_trace_cache=True))
    assert got == {"stats": {"hits": 1, "misses": 2}, "same": True}, got


def test_another_signature_runs_the_front_end_as_torch_would():
    """A torch whose generate_ttir takes other arguments (none, or more) gets them passed through, uncached."""
    calls = []

    def generate(kernel, kwargs, *args, **kw):
        calls.append((args, kw))
        return "module", list(kwargs)

    memo = ttir_cache.cached(generate)
    kernel = _Kernel()
    for _ in range(2):
        memo(kernel, {"x": _t(2)})
        memo(kernel, {"x": _t(2)}, {}, "extra")
    assert len(calls) == 4 and ttir_cache.stats()["hits"] == 0
    memo(kernel, {"x": _t(2)}, tma_descriptor_metadata={})
    memo(kernel, {"x": _t(2)}, {})  # the keyword and the positional form share the entry
    assert len(calls) == 5 and ttir_cache.stats() == {"hits": 1, "misses": 1}
