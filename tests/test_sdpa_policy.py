"""Which attention kernels the DP graphs are traced with (sdpa_policy.py): graphs of symbolic lengths prefer the
kernels without per-shape plans (flash, memory-efficient), except under CUDA graphs, whose replays skip the host and
so keep PyTorch's order (cuDNN first on Hopper); graphs of fixed sizes, or of a symbolic batch size alone, keep
PyTorch's order."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend

import dpcompile
from dpcompile.sdpa_policy import attention_for

FLASH_FIRST = [int(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)]


def _graph(dynamic: bool) -> torch.fx.GraphModule:
    seen = []

    def capture(gm, inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x.sin() * 2, backend=capture, dynamic=dynamic)(torch.randn(4, 3))
    return seen[0]


def _order() -> list:
    return [int(b) for b in torch._C._get_sdp_priority_order()]


@pytest.mark.parametrize("dynamic, cuda_graphs, flash_first", [
    (True, False, True), (True, True, False), (False, False, False)])
def test_priority_while_tracing(dynamic, cuda_graphs, flash_first):
    before = _order()
    with attention_for(_graph(dynamic), cuda_graphs=cuda_graphs):
        inside = _order()
    assert _order() == before  # restored on exit
    if flash_first:
        assert inside[:len(FLASH_FIRST)] == FLASH_FIRST
    else:
        assert inside == before


def _assert_order_at_inductor(monkeypatch, flash_first: bool, **compile_kwargs) -> None:
    """The SDPA priority order in force when the flashdp backend hands a DP graph of a (4, 5, 3) input to Inductor:
    flash first, or PyTorch's own."""
    seen = []

    def fake_compile_fx(gm, inputs, config_patches=None, **kw):
        seen.append(_order())
        raise RuntimeError("stop here")

    import torch._inductor.compile_fx as inductor_compile_fx

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    before = _order()
    compiled = dpcompile.compile(nn.Linear(3, 2), loss_reduction="sum", **compile_kwargs)
    with pytest.raises(Exception, match="stop here"):
        compiled(torch.randn(4, 5, 3))
    assert seen
    assert (seen[0][:len(FLASH_FIRST)] == FLASH_FIRST) == flash_first
    if not flash_first:
        assert seen[0] == before


@pytest.mark.parametrize("mode, flash_first", [(None, True), ("reduce-overhead", False)])
def test_the_backend_keeps_pytorchs_order_under_cuda_graphs(monkeypatch, mode, flash_first):
    """The length of a DP graph's inputs is symbolic from its first call (dynamic_seq=True): flash first, unless
    CUDA graphs."""
    _assert_order_at_inductor(monkeypatch, flash_first, mode=mode)


def _batch_graph(length_dynamic: bool):
    """Dynamo's graph of a (B, T) input with B symbolic, and T too when length_dynamic; and its batch size."""
    seen = []

    def capture(gm, inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(4, 3)
    torch._dynamo.mark_dynamic(x, 0)
    if length_dynamic:
        torch._dynamo.mark_dynamic(x, 1)
    torch.compile(lambda x: x.sin() * 2, backend=capture)(x)
    value = next(iter(seen[0].graph.find_nodes(op="placeholder"))).meta["example_value"]
    if not isinstance(value, torch.Tensor):  # Dynamo may pass the symbolic sizes as inputs of their own
        value = [n.meta["example_value"] for n in seen[0].graph.find_nodes(op="placeholder")
                 if isinstance(n.meta["example_value"], torch.Tensor)][0]
    return seen[0], value.shape[0]


@pytest.mark.parametrize("length_dynamic", [False, True])
def test_only_the_batch_size_symbolic_keeps_pytorchs_order(length_dynamic):
    """A symbolic batch size alone leaves at most one plan per batch size that occurs: cuDNN stays first.
    A symbolic length as well: flash first."""
    gm, batch_size = _batch_graph(length_dynamic)
    assert isinstance(batch_size, torch.SymInt)
    before = _order()
    with attention_for(gm, batch_sizes=[batch_size]):
        inside = _order()
    assert (inside[:len(FLASH_FIRST)] == FLASH_FIRST) == length_dynamic
    if not length_dynamic:
        assert inside == before
    with attention_for(gm):  # not told which size is the batch's: every symbolic size counts
        assert _order()[:len(FLASH_FIRST)] == FLASH_FIRST


@pytest.mark.parametrize("dynamic_seq, flash_first", [(True, True), (False, False)])
def test_the_backend_keeps_pytorchs_order_with_static_lengths(monkeypatch, dynamic_seq, flash_first):
    """dpcompile.compile(dynamic_seq=False) makes the batch size the only symbolic size: PyTorch's order."""
    _assert_order_at_inductor(monkeypatch, flash_first, dynamic_seq=dynamic_seq)
