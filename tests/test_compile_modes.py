"""torch.compile modes through the flashdp backend (issue 21 item 2): mode="reduce-overhead" turns on Inductor's CUDA
graphs for the DP graphs, as torch's own Inductor backend does; unknown modes and modes on the eager backend are
refused; randomized norms take their probe seed as a graph input, so replays draw their own. The CUDA-graph
replays themselves are checked in test_gpu.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dpcompile
import dpcompile.backend as backend
from dpcompile.compile import _caused_by
from dpcompile.errors import OptionsError


def _refusal(exc_info) -> OptionsError:
    err = exc_info.value if isinstance(exc_info.value, OptionsError) else _caused_by(exc_info.value, OptionsError)
    assert err is not None, repr(exc_info.value)
    return err


def test_unknown_mode_is_refused_at_compile_naming_the_modes():
    with pytest.raises(OptionsError, match="'fast' is not a torch.compile mode.*reduce-overhead"):
        dpcompile.compile(nn.Linear(3, 2), mode="fast")


def test_mode_on_the_eager_backend_is_refused():
    torch._dynamo.reset()
    compiled = dpcompile.compile(nn.Linear(3, 2), backend="flashdp_eager", mode="reduce-overhead",
                                 loss_reduction="sum")
    with pytest.raises(Exception) as exc_info:
        compiled(torch.randn(4, 3)).sum().backward()
    assert "needs backend='flashdp'" in str(_refusal(exc_info))


@pytest.mark.parametrize("how", ["dpcompile.compile", "torch.compile"])
def test_reduce_overhead_reaches_inductor_as_cuda_graphs(monkeypatch, how):
    """The mode's config patches (torch._inductor.list_mode_options) go to compile_fx with the DP pass."""
    seen = []

    def fake_compile_fx(gm, inputs, config_patches=None, **kw):
        seen.append(dict(config_patches))
        raise RuntimeError("stop here")

    import torch._inductor.compile_fx as inductor_compile_fx

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    model = nn.Linear(3, 2)
    if how == "torch.compile":  # torch.compile takes mode or options, not both: the mode alone, default options
        compiled = torch.compile(model, backend="flashdp", mode="reduce-overhead")
    else:
        compiled = dpcompile.compile(model, mode="reduce-overhead", loss_reduction="sum")
    with pytest.raises(Exception, match="stop here"):
        compiled(torch.randn(4, 3))
    assert seen and seen[0]["triton.cudagraphs"] is True and "joint_custom_pre_pass" in seen[0]


def test_randomized_norms_take_their_seed_as_an_input_of_the_graph(monkeypatch):
    """Randomized norms under any mode: the probe seed is an input the backend appends to the graph (what a CUDA
    graph's replay copies in), never an op inside it; the wrapper draws one per call that can backpropagate."""
    from dpcompile.codegen import randomized_ops as RO

    seen = []

    def fake_compile_fx(gm, inputs, config_patches=None, **kw):
        seen.append(([n.name for n in gm.graph.find_nodes(op="placeholder")], inputs[-1]))
        raise RuntimeError("stop here")

    import torch._inductor.compile_fx as inductor_compile_fx

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    compiled = dpcompile.compile(nn.Linear(3, 2), mode="reduce-overhead", strategy="randomized",
                                 loss_reduction="sum")
    with pytest.raises(Exception, match="stop here"):
        compiled(torch.randn(4, 5, 3))
    ((names, seed),) = seen
    assert names[-1] == "dpcompile_probe_seed" and seed.dtype == torch.int64 and seed.shape == (1,)
    monkeypatch.undo()
    drawn = []
    monkeypatch.setattr(backend, "draw_probe_seed",
                        lambda device, draw=RO.draw_probe_seed: drawn.append(draw(device)) or drawn[-1])
    torch._dynamo.reset()
    compiled = dpcompile.compile(nn.Linear(3, 2), mode="reduce-overhead", strategy="randomized",
                                 loss_reduction="sum")
    x = torch.randn(4, 5, 3)
    for _ in range(3):
        compiled(x).sum().backward()
    with torch.no_grad():
        compiled(x)
    assert len(drawn) == 3 and len({int(s) for s in drawn}) == 3


def test_reduce_overhead_on_cpu_is_exact():
    """On CPU Inductor leaves CUDA graphs out by itself: the same clipped sums as the default mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    grads = []
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        dpcompile.compile(model, mode=mode, max_grad_norm=0.1, loss_reduction="sum")(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert backend.mode_config_patches("default") == {}


def test_make_private_passes_the_mode_to_dpcompile_compile(monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    from dpcompile.privacy import engine

    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OptionsError, match="'fast' is not a torch.compile mode"):
        dpcompile.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, mode="fast")
    seen = []
    compile_ = engine.dp_compile
    monkeypatch.setattr(engine, "dp_compile", lambda *a, **kw: seen.append(kw) or compile_(*a, **kw))
    dpcompile.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, backend="flashdp",
                           mode="reduce-overhead")
    assert [kw.get("mode") for kw in seen] == ["reduce-overhead"]
