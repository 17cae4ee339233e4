"""codegen/mutation_cache.py: Inductor's analysis of which arguments a user Triton kernel writes, memoized per
specialization (what torch's generate_ttir makes of the arguments). The real analysis needs a GPU target
(test_gpu.py checks it against the uncached one); here a counting stand-in checks the key and the copies."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dpcompile.codegen import mutation_cache


class _Kernel:
    arg_names = ["x", "y", "n", "BLOCK"]


def _counting():
    calls = []

    def analysis(kernel, kwargs, tma_descriptor_metadata):
        calls.append(dict(kwargs))
        return [name for name, v in kwargs.items() if isinstance(v, torch.Tensor)][-1:]

    return mutation_cache.memoized(analysis), calls


def _fakes(*shapes, dtype=torch.float32):
    with FakeTensorMode():
        return [torch.empty(s, dtype=dtype) for s in shapes]


def test_one_analysis_per_specialization():
    cached, calls = _counting()
    k = _Kernel()
    a, b = _fakes(4, 4)
    c, d = _fakes((8, 3), 24)  # other shapes: generate_ttir sees 2-element tensors of the same dtype either way
    assert cached(k, {"x": a, "y": b, "n": 4, "BLOCK": 16}, {}) == ["y"]
    assert cached(k, {"x": c, "y": d, "n": 4, "BLOCK": 16}, {}) == ["y"]
    assert len(calls) == 1
    cached(k, {"x": a, "y": b, "n": 5, "BLOCK": 16}, {})  # an integer argument may specialize (1, multiples of 16)
    cached(k, {"x": a, "y": b, "n": 4, "BLOCK": 32}, {})  # a constexpr changes the code
    e, f = _fakes(4, 4, dtype=torch.bfloat16)
    cached(k, {"x": e, "y": f, "n": 4, "BLOCK": 16}, {})  # dtypes change the code
    cached(_Kernel(), {"x": a, "y": b, "n": 4, "BLOCK": 16}, {})  # another kernel
    assert len(calls) == 5
    cached(k, {"x": e, "y": f, "n": 4, "BLOCK": 16}, tma_descriptor_metadata={})
    assert len(calls) == 5


def test_symbolic_sizes_share_an_entry():
    """generate_ttir turns every symbolic size into the integer 2: one entry for all of them."""
    cached, calls = _counting()
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        x = torch.empty(4)
    s0 = env.create_unbacked_symint()
    s1 = env.create_unbacked_symint()
    cached(_k := _Kernel(), {"x": x, "y": x, "n": s0, "BLOCK": 16}, {})
    cached(_k, {"x": x, "y": x, "n": s1 * 3, "BLOCK": 16}, {})
    assert len(calls) == 1
    cached(_k, {"x": x, "y": x, "n": 2, "BLOCK": 16}, {})  # a concrete 2 is a different token (it may differ)
    assert len(calls) == 2


@pytest.mark.parametrize("odd", ["real tensor", "tma", "object"])
def test_what_the_key_cannot_capture_always_runs(odd):
    cached, calls = _counting()
    k = _Kernel()
    (a,) = _fakes(4)
    kwargs = {"x": a, "y": a, "n": 4, "BLOCK": 16}
    tma = {}
    if odd == "real tensor":  # a real tensor's address alignment may specialize the kernel
        kwargs["y"] = torch.empty(4)
    elif odd == "tma":
        tma = {"x": ("stable", ([4],))}
    else:
        kwargs["n"] = object()
    for _ in range(3):
        cached(k, kwargs, tma)
    assert len(calls) == 3


def test_hits_are_copies():
    cached, calls = _counting()
    k = _Kernel()
    (a,) = _fakes(4)
    first = cached(k, {"x": a, "y": a, "n": 4, "BLOCK": 16}, {})
    first.append("mutated by a caller")
    assert cached(k, {"x": a, "y": a, "n": 4, "BLOCK": 16}, {}) == ["y"]


def _restore_after(monkeypatch) -> list:
    """The analysis names of this torch; they (and any module-level imports of them) are restored after the test."""
    import torch._inductor.graph
    import torch._inductor.ir
    import torch._inductor.lowering
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    for module in (wrap, torch._inductor.ir, torch._inductor.graph, torch._inductor.lowering):
        for name in mutation_cache.ANALYSES:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    return [n for n in mutation_cache.ANALYSES if hasattr(wrap, n)]


def test_install_wraps_torchs_analysis_once(monkeypatch):
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    names = _restore_after(monkeypatch)
    assert names, "neither analysis function exists in this torch: update mutation_cache.ANALYSES"
    mutation_cache.install(force=True)
    wrapped = {n: getattr(wrap, n) for n in names}
    assert all(hasattr(f, "dp_mutation_cache") for f in wrapped.values())
    mutation_cache.install(force=True)
    assert {n: getattr(wrap, n) for n in names} == wrapped  # not wrapped twice


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_off_unless_turned_on(monkeypatch, env):
    """Off by default until a GPU has checked it against torch's analysis (NOTES 30): DPCOMPILE_MUTATION_CACHE=1."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    names = _restore_after(monkeypatch)
    for name in names:  # as torch has it, whatever an earlier test of this process installed
        fn = getattr(wrap, name)
        monkeypatch.setattr(wrap, name, getattr(fn, "__wrapped__", fn))
    if env is None:
        monkeypatch.delenv("DPCOMPILE_MUTATION_CACHE", raising=False)
    else:
        monkeypatch.setenv("DPCOMPILE_MUTATION_CACHE", env)
    mutation_cache.install()
    assert all(hasattr(getattr(wrap, n), "dp_mutation_cache") == (env == "1") for n in names)
