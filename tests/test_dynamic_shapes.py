"""Batch size and sequence length both symbolic, end to end (issue 19): several models compiled one after the
other in one process, B and T drawn per step, every step's gradients against the float64 oracle at a small C
(every sample clipped) and a large C (none clipped), and the number of graphs each model compiles.

The graph bound (docs/gradient-contract.md): one graph per class of shapes that Dynamo or the model's own code
tells apart, and nothing more from dpcompile. Dynamo specializes sizes 0 and 1, so B falls in {0, 1, >= 2} and
T in {1, >= 2}; a causal LM loss over T - 1 shifted targets also tells T = 2 apart.
"""
from __future__ import annotations

import copy
import os
import random
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpcompile
import dpcompile.backend
import models
from dp_check import CountingBackend, LossModule, oracle_grads
from dpcompile.compile import _caused_by
from dpcompile.passes.symbolic import graph_shape_env
from dpcompile.testing import oracle

SMALL_C, LARGE_C = 1e-3, 1e3  # every sample clipped / none clipped (a scaling bug shows only there)
ATOL, RTOL = 1e-9, 1e-7  # dp_check's tolerance for float64 models


def assert_grad_close(got, want, msg, rtol=RTOL, atol=ATOL):
    """dp_check's criterion: the largest error within atol + rtol * the parameter's largest gradient entry."""
    got = got if got is not None else torch.zeros_like(want)
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"{msg}: max err {err:.3e} (scale {scale:.3e})"


def _tokens(vocab, B, T, g):
    tok = torch.randint(0, vocab, (B, T + 1), generator=g)
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def _regression(d_in, d_out):
    return lambda B, T, g: (torch.randn(B, T, d_in, generator=g, dtype=torch.float64),
                            torch.randn(B, T, d_out, generator=g, dtype=torch.float64))


# plain PyTorch models whose batch maker takes T: (case, make(B, T, generator), clipping)
PLAIN = {
    "mlp3d": lambda: (models.mlp(input_ndim=3), _regression(3, 2), "flat"),
    "gpt_tied_manual_pad": lambda: (models.gpt_like(tied=True, attn="manual", padding_idx=0, n_layer=1, T=12),
                                    lambda B, T, g: _tokens(11, B, T, g), "per_layer"),
    "llama_gqa_rope": lambda: (models.llama_like(n_head=4, n_kv_head=2, n_layer=1, T=12),
                               lambda B, T, g: _tokens(11, B, T, g), "per_layer"),
    "mha_time_major": lambda: (models.mha(batch_first=False), _regression(4, 4), "per_param"),
}


def _plain_shapes(rng: random.Random) -> list:
    """Random (B, T) per step, with B == T, B = 1, B = 0 and T = 1 among them."""
    shapes = [(rng.randint(2, 6), rng.randint(2, 12)) for _ in range(3)]
    n = rng.randint(2, 6)
    shapes += [(n, n), (1, rng.randint(2, 12)), (0, rng.randint(1, 12)), (rng.randint(2, 6), 1),
               (rng.randint(2, 6), rng.randint(2, 12))]
    rng.shuffle(shapes)
    return shapes


def _shape_class(B: int, T: int, lm_shift: bool = False) -> tuple:
    return min(B, 2), min(T, 3 if lm_shift else 2)


def _run_steps(compiled, model, case, make, shapes, C, clipping, counter, seed=0):
    """Each step's .grad against the float64 oracle; then the graph count against the shape classes seen."""
    g = torch.Generator().manual_seed(seed)
    for B, T in shapes:
        batch = make(B, T, g)
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=C, clipping=clipping)
        for name, p in model.named_parameters():
            assert_grad_close(p.grad, want[name], f"{case.name} B={B} T={T} C={C} {name}")
    assert counter.graphs == len({_shape_class(B, T) for B, T in shapes}), (case.name, shapes, counter.graphs)


def _compile(case, model, C, clipping, mean=True, **kw):
    counter = CountingBackend()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, mean), backend=counter, max_grad_norm=C,
                                 clipping=clipping, loss_reduction="mean" if mean else "sum", **kw)
    return compiled, counter


def test_plain_models_one_after_another_match_the_oracle_with_one_graph_per_shape_class():
    """Four models in one process, Dynamo reset only at the start: what compiled before must not change how a
    model compiles (automatic dynamic once made T dynamic only in a process that had seen two lengths)."""
    torch._dynamo.reset()
    rng = random.Random(19)
    for name, make_case in PLAIN.items():
        case, make, clipping = make_case()
        model = copy.deepcopy(case.model).double()
        shapes = _plain_shapes(rng)
        compiled, counter = _compile(case, model, SMALL_C, clipping)
        _run_steps(compiled, model, case, make, shapes, SMALL_C, clipping, counter, seed=1)
        # large C: nothing clipped, so the loss's 1/B must be undone exactly; B >= 2 and T >= 2 share one graph
        big = [(B, T) for B, T in shapes if B >= 2 and T >= 2]
        compiled, counter = _compile(case, model, LARGE_C, clipping)
        _run_steps(compiled, model, case, make, big, LARGE_C, clipping, counter, seed=2)
        assert counter.graphs == 1


# ----------------------------------------------------------------------------------------------------------
# transformers models with padding masks


def _padded(vocab, B, T, g, left):
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T)[None]
    mask = (pos >= T - lengths[:, None]) if left else (pos < lengths[:, None])
    return ids.masked_fill(~mask, 0), mask.long()


def _strip_padding(m, ids, mask):
    """The oracle's per-sample loss: the sample alone, without its padding."""
    return m(ids[:, mask[0].bool()])


@pytest.mark.parametrize("make,left,clipping,rtol", [
    (lambda: models.hf_gpt2(T=16, n_layer=1), False, "per_layer", RTOL),
    # transformers computes RoPE angles in float32 (LlamaRotaryEmbedding casts to .float()); their sin / cos
    # differ by an ulp between a batched and a one-sample call, so the float64 model agrees to ~1e-7 relative
    (lambda: models.hf_llama(T=16, layers=1, heads=4, kv_heads=2), True, "flat", 2e-6),
], ids=["gpt2_tied-right_pad", "llama_gqa_rope-left_pad"])
def test_hf_models_with_padding_any_batch_and_length(make, left, clipping, rtol):
    """B and T drawn per step (B == T, B = 1 and T = 2 among them) against the oracle that runs each sample
    alone without padding; one graph per class (B in {1, >= 2}, T in {2, >= 3}: the shifted loss tells T = 2
    apart). B = 0 and T = 1 (no target at all) are not drawn here."""
    from dpcompile.hf import CausalLMLoss

    case = make()
    rng = random.Random(7)
    shapes = [(rng.randint(2, 6), rng.randint(3, 12)) for _ in range(2)]
    n = rng.randint(3, 6)
    shapes += [(n, n), (1, rng.randint(3, 12)), (rng.randint(2, 6), 2), (rng.randint(2, 6), rng.randint(3, 12))]
    torch._dynamo.reset()
    for C, steps in ((SMALL_C, shapes), (LARGE_C, [(B, T) for B, T in shapes if B >= 2 and T >= 3])):
        model = CausalLMLoss(copy.deepcopy(case.model).double())
        counter = CountingBackend()
        dp = dpcompile.compile(model, backend=counter, max_grad_norm=C, clipping=clipping)
        g = torch.Generator().manual_seed(int(C * 1000))
        for B, T in steps:
            ids, mask = _padded(64, B, T, g, left)
            model.zero_grad(set_to_none=True)
            dp(ids, mask).backward()
            want = oracle.reference_clipped_grads(model, _strip_padding, (ids, mask), max_grad_norm=C,
                                                  clipping=clipping)
            for name, p in model.named_parameters():
                assert_grad_close(p.grad, want[name], f"B={B} T={T} C={C} {name}", rtol)
        assert counter.graphs == len({_shape_class(B, T, lm_shift=True) for B, T in steps}), (steps, counter.graphs)


# ----------------------------------------------------------------------------------------------------------
# what the pass itself does to the ShapeEnv


def test_the_pass_never_specializes_a_size(monkeypatch):
    """The DP pass adds no guard that fixes or bounds a size (int() of T in the planner once specialized every
    graph to the length of its first call): only equalities between sample-carrying inputs' sizes, which the
    backend's choice of those inputs assumes. Checked over every linear strategy, in flat and per-layer groups."""
    added = []
    run = dpcompile.backend.run_dp_pass

    def recording(graph, ctx):
        shape_env = graph_shape_env(graph)
        before = len(shape_env.guards)
        run(graph, ctx)
        added.extend(g.expr for g in shape_env.guards[before:])

    monkeypatch.setattr(dpcompile.backend, "run_dp_pass", recording)
    case = models.gpt_like(tied=False, n_layer=1, T=12)
    for strategy, clipping in [("direct", "flat"), ("ghost", "per_layer"), ("single_pass", "per_layer"),
                               ("stored", "flat"), ("two_pass", "flat"), ("randomized", "per_layer")]:
        torch._dynamo.reset()
        model = copy.deepcopy(case.model).double()
        compiled, counter = _compile(case, model, 0.1, clipping, strategy={"m.blocks.*": strategy})
        g = torch.Generator().manual_seed(3)
        for B, T in [(3, 4), (5, 11), (2, 7)]:
            compiled(*_tokens(11, B, T, g)).backward()
        assert counter.graphs == 1, strategy
    assert added, "the pass should have equated the targets' batch size with the inputs'"
    for expr in added:  # an equation between two sizes, never a size against a number
        assert isinstance(expr, sympy.Eq) and len((expr.lhs - expr.rhs).free_symbols) >= 2, expr


def test_one_token_samples_keep_the_batch_size_symbolic():
    """B = 2, T = 1 first: inside the embedding ops a size n - 1 = B*T - 1 has the hint 1, and a broadcast that
    asked "is it 1?" once specialized B to 2 (NOTES.md, entry 17 addendum). One graph for every B >= 2, exact."""
    case = models.gpt_like(vocab=5, tied=False, n_layer=1, T=1)
    torch._dynamo.reset()
    model = copy.deepcopy(case.model).double()
    compiled, counter = _compile(case, model, 1e-3, "flat", mean=False)
    g = torch.Generator().manual_seed(5)
    for B in (2, 3, 6):
        model.zero_grad(set_to_none=True)
        batch = _tokens(5, B, 1, g)
        compiled(*batch).backward()
        want = oracle_grads(case, batch, max_grad_norm=1e-3, clipping="flat")
        for name, w in want.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, w, rtol=1e-6, atol=1e-9)
    assert counter.graphs == 1


def test_a_call_whose_targets_have_another_batch_size_compiles_its_own_graph():
    """The graph was built taking the targets to carry the same samples as the inputs (they line up at the
    compiling call). With B and T symbolic, Dynamo alone only knows B*T == B'*T' (a flatten): a call with targets
    of shape (3, 8) next to inputs (4, 6) must never reuse that graph. Its own compile refuses it (the targets'
    8 = 2 * 4 columns never line up with the inputs' samples: passes/sample_inputs.py)."""
    case = models.gpt_like(tied=True, n_layer=1, T=12)
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    compiled, counter = _compile(case, model, 1.0, "per_layer", mean=False)
    idx = torch.randint(0, 11, (4, 6))
    compiled(idx, torch.randint(0, 11, (4, 6))).backward()
    assert counter.graphs == 1
    with pytest.raises(Exception) as info:
        compiled(idx, torch.randint(0, 11, (3, 8))).backward()
    assert _caused_by(info.value, dpcompile.DPCompileError) is not None, info.value
    assert counter.graphs == 1


# ----------------------------------------------------------------------------------------------------------
# marking: independent of process history; dynamic_seq=False pins T


def test_dynamic_seq_false_compiles_one_graph_per_length_even_after_lengths_varied():
    """dynamic_seq=False pins the lengths static, also where Dynamo's automatic dynamic has already seen this
    code run with several lengths (a previous compile of the same model class)."""
    case, make, clipping = PLAIN["mlp3d"]()
    torch._dynamo.reset()
    for dynamic_seq, want_graphs in ((True, 1), (False, 3)):
        model = copy.deepcopy(case.model).double()
        compiled, counter = _compile(case, model, SMALL_C, clipping, dynamic_seq=dynamic_seq)
        _run_steps_no_count(compiled, model, case, make, [(3, 4), (2, 6), (4, 4), (5, 9)], SMALL_C, clipping)
        assert counter.graphs == want_graphs, dynamic_seq
    with pytest.raises(TypeError, match="dynamic_seq"):
        dpcompile.compile(case.model, dynamic_seq="yes")


def test_plain_torch_compile_gets_a_dynamic_length_from_automatic_dynamic():
    """torch.compile with the backend (no dpcompile.compile marking): Dynamo compiles the first length static and
    makes T dynamic at the second; that graph (B and T symbolic) must be exact too."""
    case, make, clipping = PLAIN["gpt_tied_manual_pad"]()
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    counter = CountingBackend()
    compiled = torch.compile(LossModule(model, case.loss_fn, True), backend=counter, fullgraph=True,
                             options={"max_grad_norm": SMALL_C, "clipping": clipping})
    _run_steps_no_count(compiled, model, case, make, [(3, 4), (3, 7), (5, 9), (2, 5)], SMALL_C, clipping)
    assert counter.graphs == 3  # (3, 4) static; (3, 7): T dynamic; (5, 9): B dynamic too


def _run_steps_no_count(compiled, model, case, make, shapes, C, clipping):
    g = torch.Generator().manual_seed(5)
    for B, T in shapes:
        batch = make(B, T, g)
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=C, clipping=clipping)
        for name, p in model.named_parameters():
            assert_grad_close(p.grad, want[name], f"B={B} T={T} {name}")


# ----------------------------------------------------------------------------------------------------------
# images: the dims after the batch dim are (C, H, W)


@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_conv_nets_any_batch_and_image_size(head):
    """pool: H and W vary freely (one graph). flatten: a Linear on the flattened (C, H, W) fixes C*H*W by a guard
    but not H and W apart, so the backward's view back to (C, H, W) is one sample's block only by that guard."""
    torch.manual_seed(0)
    if head == "pool":
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1))
        shapes = [(4, 5, 5), (3, 7, 6), (6, 4, 9), (5, 5, 5)]
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                    torch.nn.Linear(3 * 2 * 2, 1))
        shapes = [(4, 4, 4), (3, 4, 4), (6, 4, 4)]
    model = model.double()

    def loss(m, x):
        return m(x).pow(2).sum()

    torch._dynamo.reset()
    counter = CountingBackend()
    compiled = dpcompile.compile(LossModule(model, loss, False), backend=counter, max_grad_norm=SMALL_C,
                                 clipping="per_layer", loss_reduction="sum")
    for B, H, W in shapes:
        x = torch.randn(B, 2, H, W, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        compiled(x).backward()
        want = oracle.reference_clipped_grads(model, loss, (x,), max_grad_norm=SMALL_C, clipping="per_layer")
        for name, p in model.named_parameters():
            assert_grad_close(p.grad, want[name], f"B={B} H={H} W={W} {name}")
    assert counter.graphs == 1


# ----------------------------------------------------------------------------------------------------------
# a layout that cannot be split with two symbolic sizes: recompiled static, with one warning


class _TimeMajorRows(torch.nn.Module):
    """A Linear over rows ordered (t, b, u): sample b's rows are blocks of U repeated T times, both dynamic."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):  # x: (B, T, U, 3)
        B, T, U, d = x.shape
        h = self.lin(x.permute(1, 0, 2, 3).reshape(T * B * U, d))
        return h.view(T, B, U, 2).permute(1, 0, 2, 3)


def test_a_layout_with_two_symbolic_block_sizes_recompiles_static_and_warns_once():
    from dpcompile.errors import SymbolicLayoutError

    torch.manual_seed(0)
    model = _TimeMajorRows().double()

    def loss(m, x, y):
        return (m(x) - y).pow(2).sum()

    torch._dynamo.reset()
    counter = CountingBackend()
    compiled = dpcompile.compile(LossModule(model, loss, False), backend=counter, max_grad_norm=SMALL_C,
                                 clipping="flat", loss_reduction="sum")
    seen = []
    for B, T, U in [(3, 4, 2), (4, 5, 3), (2, 4, 2)]:
        x = torch.randn(B, T, U, 3, dtype=torch.float64)
        y = torch.randn(B, T, U, 2, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(x, y).backward()
        seen += [str(w.message) for w in caught if "dpcompile" in str(w.message)]
        want = oracle.reference_clipped_grads(model, loss, (x, y), max_grad_norm=SMALL_C, clipping="flat")
        for name, p in model.named_parameters():
            assert_grad_close(p.grad, want[name], f"B={B} T={T} U={U} {name}")
    assert len(seen) == 1 and "static" in seen[0] and "both sizes are symbolic" in seen[0], seen
    assert counter.graphs == 2  # (T, U) = (4, 2) static, B dynamic, served (3, 4, 2) and (2, 4, 2); then (5, 3)
    assert not compiled.dynamic_seq
    assert issubclass(SymbolicLayoutError, dpcompile.UnsupportedGradientError)


# ----------------------------------------------------------------------------------------------------------
# property: short shape sequences


@settings(max_examples=8, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=4),
       small=st.booleans())
def test_any_short_sequence_of_shapes(shapes, small):
    case, make, clipping = PLAIN["mlp3d"]()
    model = copy.deepcopy(case.model).double()
    torch._dynamo.reset()
    C = SMALL_C if small else LARGE_C
    compiled, counter = _compile(case, model, C, clipping)
    _run_steps(compiled, model, case, make, shapes, C, clipping, counter, seed=len(shapes))


# ----------------------------------------------------------------------------------------------------------
# the product backend


@pytest.mark.inductor
def test_inductor_serves_every_length_with_one_graph():
    case, make, clipping = PLAIN["mlp3d"]()
    model = copy.deepcopy(case.model)
    calls = []

    def counting(gm, example_inputs, **kw):
        out = dpcompile.flashdp(gm, example_inputs, **kw)
        calls.append(1)
        return out

    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, True), backend=counting, max_grad_norm=0.05,
                                 clipping=clipping)
    g = torch.Generator().manual_seed(0)
    for B, T in [(3, 4), (5, 7), (4, 4)]:
        batch = tuple(t.float() for t in make(B, T, g))
        model.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=0.05, clipping=clipping)
        for name, p in model.named_parameters():
            assert_grad_close(p.grad, want[name], f"B={B} T={T} {name}", rtol=2e-4, atol=2e-5)  # float32
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["direct", "ghost", "single_pass", "stored"])
def test_cuda_triton_kernels_serve_every_length_with_one_graph(strategy):
    """On CUDA the linear sites run Triton kernels inlined by Inductor, traced with a symbolic T: their launch
    parameters (grid, autotune key) must not guard on T, and the results must hold at every length."""
    case = models.gpt_like(tied=False, n_layer=1, d=16, T=256)
    model = copy.deepcopy(case.model).cuda()
    calls = []

    def counting(gm, example_inputs, **kw):
        out = dpcompile.flashdp(gm, example_inputs, **kw)
        calls.append(1)
        return out

    torch._dynamo.reset()
    compiled = dpcompile.compile(LossModule(model, case.loss_fn, True), backend=counting, max_grad_norm=0.05,
                                 clipping="per_layer", strategy={"m.blocks.*": strategy})
    g = torch.Generator().manual_seed(0)
    # across T = 128: the ghost kernel's buffer once had ceil(T/128)^2 columns, and recompiled there
    for B, T in [(3, 5), (6, 33), (2, 17), (4, 64), (2, 130), (3, 200)]:
        batch = _tokens(11, B, T, g)
        model.zero_grad(set_to_none=True)
        compiled(*(t.cuda() for t in batch)).backward()
        want = oracle.reference_clipped_grads(case.model, case.loss_fn, batch, max_grad_norm=0.05,
                                              clipping="per_layer")
        for name, p in model.named_parameters():
            assert_grad_close(p.grad.cpu(), want[name], f"{strategy} B={B} T={T} {name}", rtol=5e-4, atol=5e-5)
    assert len(calls) == 1
