"""Which fused attention kernel a graph with symbolic sizes is traced with.

cuDNN's attention builds an execution plan for every distinct shape: 3 to 5 ms of host time a call on an H100
(benchmarks/RESULTS.md run 27), about 90 ms a step on gpt2-small when the batch size and the sequence length change
every step, so a run whose shapes rarely repeat pays it almost every step. Flash and memory-efficient attention
have no per-shape plan. AOTAutograd picks the SDPA kernel when it traces, so a graph traced with symbolic sizes is
traced preferring those two: the choice costs nothing per call. Fixed-shape graphs keep PyTorch's order, and a kernel
the user disabled stays disabled (only the priority changes).

Under CUDA graphs (mode="reduce-overhead") the plan is built once per recorded shape and every replay skips the
host, so PyTorch's order stays: on gpt2-small B=8 T=1024 (H200) flash's backward took 2.38 ms a step against
cuDNN's 1.76 ms (benchmarks/NOTES.md, entry 19).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# no per-shape set-up first; cuDNN and math stay as fallbacks for what flash and efficient cannot run
SHAPE_FREE_FIRST = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH)
_ENABLED = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
            SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled}


def has_symbolic_sizes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo's graph takes a symbolic size (a SymInt input, or a tensor input of symbolic shape)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


@contextlib.contextmanager
def attention_for(gm: torch.fx.GraphModule, cuda_graphs: bool = False) -> Iterator[None]:
    """Trace `gm` preferring attention kernels without per-shape plans when its sizes are symbolic and its calls
    are not replayed from CUDA graphs."""
    order = [b for b in SHAPE_FREE_FIRST if _ENABLED[b]()]
    if cuda_graphs or not has_symbolic_sizes(gm) or not order:
        yield
        return
    with sdpa_kernel(order, set_priority=True):
        yield
