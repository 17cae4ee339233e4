"""Which fused attention kernel a graph with symbolic sizes is traced with.

cuDNN's attention builds an execution plan for every distinct shape: 3 to 5 ms of host time a call on an H100
(benchmarks/RESULTS.md run 27), about 90 ms a step on gpt2-small when the batch size and the sequence length change
every step, so a run whose shapes rarely repeat pays it almost every step. Flash and memory-efficient attention
have no per-shape plan. AOTAutograd picks the SDPA kernel when it traces, so a graph traced with symbolic sizes is
traced preferring those two: the choice costs nothing per call. Fixed-shape graphs keep PyTorch's order, and a kernel
the user disabled stays disabled (only the priority changes).

A graph whose only symbolic size is the batch size (dpcompile.compile(dynamic_seq=False), `dpcompile train`'s
fixed-length windows) keeps PyTorch's order too: its shapes number at most the batch sizes that occur (a Poisson
loop's micro-batches are nearly all full), so cuDNN builds a handful of plans in a run, and its kernels are faster
(flash's forward and backward took ~0.9 ms more a step on gpt2-small B=8 T=1024 on an H100, run 45).

Under CUDA graphs (mode="reduce-overhead") the plan is built once per recorded shape and every replay skips the
host, so PyTorch's order stays: on gpt2-small B=8 T=1024 (H200) flash's backward took 2.38 ms a step against
cuDNN's 1.76 ms (benchmarks/NOTES.md, entry 19).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# no per-shape set-up first; cuDNN and math stay as fallbacks for what flash and efficient cannot run
SHAPE_FREE_FIRST = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH)
_ENABLED = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
            SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled}


def _symbols(size) -> set:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def has_symbolic_sizes(gm: torch.fx.GraphModule, batch_sizes: Iterable = ()) -> bool:
    """Whether Dynamo's graph takes a symbolic size (a SymInt input, or a tensor input of symbolic shape) that
    depends on a symbol other than those of `batch_sizes` (the batch inputs' batch dims)."""
    batch = set().union(*(_symbols(b) for b in batch_sizes))
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        sizes = [value] if isinstance(value, torch.SymInt) else value.shape if isinstance(value, torch.Tensor) else ()
        if any(_symbols(s) - batch for s in sizes):
            return True
    return False


@contextlib.contextmanager
def attention_for(gm: torch.fx.GraphModule, cuda_graphs: bool = False, batch_sizes: Iterable = ()) -> Iterator[None]:
    """Trace `gm` preferring attention kernels without per-shape plans when sizes other than the batch size are
    symbolic and its calls are not replayed from CUDA graphs."""
    order = [b for b in SHAPE_FREE_FIRST if _ENABLED[b]()]
    if cuda_graphs or not has_symbolic_sizes(gm, batch_sizes) or not order:
        yield
        return
    with sdpa_kernel(order, set_priority=True):
        yield
