"""The rows-group kernel (codegen/kernels/rows.py) against its PyTorch reference and the factor's home
(clipping.group_clip_factors): interpreter on CPU, the real kernel on a GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcompile.clipping import group_clip_factors
from dpcompile.codegen.kernels import rows as K
from dpcompile.codegen.ops import rows_group_clipped_sum_reference
from no_interpreter import last_json, run_script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, widths, with_rest, scale, seed):
    """with_rest: False, True (the other norms (B,)) or K > 1 (the other norms as (B, K) parts, a weight's rows)."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(B, p, generator=g) * scale).to(DEVICE) for p in widths]
    parts = (B,) if with_rest is True else (B, int(with_rest))
    rest = (torch.rand(*parts, generator=g) * scale * scale * 10).to(DEVICE) if with_rest else None
    return xs, rest


def _check(xs, rest, threshold, clip_fn, mean):
    got = K.group_clip_rows(xs, rest, threshold, clip_fn, mean)
    want = rows_group_clipped_sum_reference([x.double() for x in xs], None if rest is None else rest.double(),
                                            threshold, clip_fn, mean)
    assert len(got) == len(xs) + 1
    assert got[0].shape == (xs[0].shape[0],) and got[0].dtype == torch.float32
    for g_, w, x in zip(got[1:], want[1:], xs):
        assert g_.shape == (x.shape[1],) and g_.dtype == torch.float32
    torch.testing.assert_close(got[0].double().cpu(), want[0].cpu(), rtol=1e-5, atol=1e-6)
    for g_, w in zip(got[1:], want[1:]):
        scale = 1 + (w.abs().max().item() if w.numel() else 0)
        torch.testing.assert_close(g_.double().cpu(), w.cpu(), rtol=1e-5, atol=1e-5 * scale)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(0, 40), widths=st.lists(st.integers(1, 700), min_size=1, max_size=2),
       with_rest=st.sampled_from([False, True, 2, 300]), scale=st.sampled_from([1e-3, 1.0, 30.0]), threshold=st.sampled_from([0.05, 1.0, 1e3]),
       clip_fn=st.sampled_from(["abadi", "automatic"]), mean=st.booleans(), seed=st.integers(0, 2**16))
def test_group_clip_rows_matches_reference(B, widths, with_rest, scale, threshold, clip_fn, mean, seed):
    """B = 0, 1, and past one block of samples; one or two sites, narrow and past one program's columns; the other
    norms none, (B,) or (B, K) parts (K past one scan of columns); norms far below and far above the threshold
    (factor 1 and factor < 1)."""
    xs, rest = _inputs(B, widths, with_rest, scale, seed)
    _check(xs, rest, threshold, clip_fn, mean)


def test_factor_is_the_contract_formula():
    """The kernel's factors are clipping.group_clip_factors of every site's squared norm plus rest."""
    xs, rest = _inputs(5, [3, 9], True, 1.0, 7)
    coef = K.group_clip_rows(xs, rest, 0.7, "abadi", True)[0]
    sq = sum(x.double().pow(2).sum(1) for x in xs) + rest.double()
    torch.testing.assert_close(coef.double().cpu(), group_clip_factors(sq, 0.7, "abadi", True, 5).cpu(),
                               rtol=1e-6, atol=1e-7)


def test_rest_parts_are_summed_per_sample():
    """(B, K) parts of the other norms (a weight's rows) give the factors of their per-sample sums."""
    xs, parts = _inputs(7, [5], 300, 1.0, 11)
    got = K.group_clip_rows(xs, parts, 0.7, "automatic", False)
    want = K.group_clip_rows(xs, parts.sum(1), 0.7, "automatic", False)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-7)


def test_strided_rows_of_a_wider_buffer():
    """Row sums that are column slices of a wider buffer (a row stride larger than the width)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 50, generator=g).to(DEVICE)
    xs = [wide[:, :20], wide[:, 20:45]]
    _check(xs, None, 0.3, "abadi", False)


def test_more_than_two_sites_is_refused():
    xs, _ = _inputs(2, [3, 3, 3], False, 1.0, 0)
    with pytest.raises(ValueError, match="one or two"):
        K.group_clip_rows(xs, None, 1.0, "abadi", False)


_SYMBOLIC_LAUNCH = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from dpcompile.codegen.kernels import rows as K

env = ShapeEnv()
mode = FakeTensorMode(shape_env=env)
dyn = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
xs = [mode.from_tensor(torch.randn(8, p), symbolic_context=dyn) for p in (20, 30)]
rest = mode.from_tensor(torch.rand(8), symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]))
with mode:
    coef, s0, s1 = K.group_clip_rows(xs, rest, 0.5, "abadi", True, launch=torch.library.wrap_triton)
assert isinstance(coef.shape[0], torch.SymInt) and (s0.shape, s1.shape) == ((20,), (30,))
assert not env.guards and not env.replacements, (env.guards, env.replacements)
"""


def test_launch_keeps_a_symbolic_batch_symbolic():
    """Under Inductor the batch size is a symbol: the launch must not turn it into a Python number (a float(B)
    argument guarded B == 8 and failed every dynamic-batch DP graph on the GPU; NOTES 34). Traced on fake tensors
    in a fresh process without the interpreter (which would run the kernel on them)."""
    run_script(_SYMBOLIC_LAUNCH)


_FRONT_END = """
import json
import sys
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch._higher_order_ops import triton_kernel_wrap as W
from dpcompile.codegen.kernels import rows as K

batch, threshold, has_x1 = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
fn = K._group_clip_rows_kernel
constexprs = {"HAS_X1": has_x1, "HAS_REST": True, "ABADI": True, "MEAN": True, "EPS": 1e-6, "BLOCK_B": 16,
              "BLOCK_P": 128, "SCAN": 128}
if batch.isdigit():  # Triton's launcher makes B = 1 a constant
    constexprs["B"] = int(batch)
types = {"B": batch, "threshold": threshold, "P0": "i32", "P1": "i32", "K": "i32", "s0_b": "i32", "s1_b": "i32",
         "sr_b": "i32"}
signature = {n: "constexpr" if n in constexprs else types.get(n, "*fp32") for n in fn.arg_names}
target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)
options = backend.parse_options({})
context = ir.context()
ir.load_dialects(context)
backend.load_dialects(context)
module = ASTSource(fn=fn, signature=signature, constexprs=constexprs).make_ir(
    target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
# what Inductor's analysis of the launch takes as written (torch 2.13: analyze_kernel_access; 2.11: mutations)
functions = W.ttir_to_functions(module)
name = next(iter(functions))
args = [n for n in fn.arg_names if n not in constexprs]
if hasattr(W, "analyze_kernel_access"):
    accesses = W.analyze_kernel_access(functions, name, len(args), tuple(args),
                                       frozenset(i for i, n in enumerate(args) if n.endswith("_ptr")))
    written = sorted(dep.name for dep in accesses.read_writes.writes if dep.name.endswith("_ptr"))
else:  # a flag per argument, scalars' included (the caller keeps the tensors')
    mutated = W.analyze_kernel_mutations(functions, name, len(args))
    written = sorted(n for n, m in zip(args, mutated) if m and n.endswith("_ptr"))
print(json.dumps(written))
"""


def _front_end(batch="i32", threshold="fp32", has_x1=True) -> list:
    """The kernel's Triton front end (source to TTIR, no GPU; a fresh process without the interpreter) with these
    argument types and constexprs; returns the pointers Inductor's analysis of the TTIR takes as written."""
    return last_json(run_script(_FRONT_END, batch, threshold, str(int(has_x1))))


@pytest.mark.parametrize("batch, threshold", [("i64", "fp64"), ("i32", "fp32"), ("1", "fp32")])
def test_kernel_compiles_with_the_argument_types_inductor_passes(batch, threshold):
    """Inductor passes a symbolic batch size as i64 and a float argument as fp64; Triton's own launcher passes i32 /
    fp32, and B = 1 as a constant. The kernel's front end must accept each: fp64 reaching tl.div_rn failed every
    DP compile on the GPU while the direct launches passed (benchmarks/NOTES.md 35)."""
    _front_end(batch, threshold)


@pytest.mark.parametrize("has_x1", [False, True])
def test_only_the_present_sites_pointers_are_written(has_x1):
    """Inductor clones apart, and hands back, every pointer its analysis of the TTIR finds stored through: exactly
    the outputs of the present sites, so the launcher may pass any tensor for an absent site's pointer (not a fresh
    empty one each, which the partitioner moved into the forward and saved for the backward, NOTES 36)."""
    want = ["coef_ptr", "out0_ptr"] + (["out1_ptr"] if has_x1 else [])
    assert _front_end(has_x1=has_x1) == sorted(want)


_FUNCTIONALIZED = """
import operator
import sys

import torch
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from dpcompile.codegen.kernels import rows as K

sites, with_rest = int(sys.argv[1]), sys.argv[2] == "1"
# the pointers the kernel stores through in this configuration (test_only_the_present_sites_pointers_are_written)
written = ["coef_ptr", "out0_ptr"] + (["out1_ptr"] if sites == 2 else [])


def f(*args):
    xs, rest = list(args[:sites]), args[sites] if with_rest else None
    return K.group_clip_rows(xs, rest, 0.5, "abadi", True, launch=torch.library.wrap_triton)


args = [torch.randn(8, 20 + k) for k in range(sites)] + ([torch.rand(8, 3)] if with_rest else [])
gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args)
(launch,) = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
kwargs = launch.kwargs["kwargs"]
pointers = {k: v for k, v in kwargs.items() if k.endswith("_ptr")}
for k in written:  # a written pointer's tensor is passed for no other pointer
    assert [j for j, v in pointers.items() if v is pointers[k]] == [k], (k, pointers)
outputs = gm.graph.output_node().args[0]
got = [o.args[1] if o.target is operator.getitem and o.args[0] is launch else o for o in outputs]
assert got == written, (got, written)
empties = [n for n in gm.graph.nodes if n.target is torch.ops.aten.empty.memory_format]
assert len(empties) == len(written), empties  # the outputs' allocations, no stand-in for an absent site
"""


@pytest.mark.parametrize("sites, with_rest", [(1, False), (1, True), (2, True), (2, False)])
def test_functionalized_launch_returns_what_the_kernel_wrote(sites, with_rest):
    """Under Inductor the launch is functionalized: every argument the kernel may store through is cloned apart and
    the clones replace their tensors. A written pointer's tensor may be passed for no other pointer (one site passed
    its sum as both out0 and out1, and the op returned out1's clone, which no program writes: garbage gradients for
    every bias group of one rows site), each output must be the clone of the pointer that writes it, and nothing
    is allocated for an absent site's pointers. Traced on fake tensors in a fresh process without the interpreter."""
    run_script(_FUNCTIONALIZED, str(sites), str(int(with_rest)))
