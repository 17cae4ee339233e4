"""dp_op(fake=...): the ops whose fake implementation is a metadata function rather than their body (compile time:
the pass calls them thousands of times on fake tensors). Each must give the real op's shapes, strides and dtypes:
here against the body on CPU, for every such op, over dtypes and batch sizes including 0 (test_gpu.py repeats it
with the Triton kernels)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dpcompile.codegen import ops  # noqa: F401  (registers the ops)
from dpcompile.codegen.registry import ops_with_own_fake

# op name -> inputs (B samples, T rows, M and N widths, dtype, device)
INPUTS = {
    "linear_norm": lambda B, T, M, N, dt, dev: (torch.randn(B, T, M, dtype=dt, device=dev),
                                                torch.randn(B, T, N, dtype=dt, device=dev)),
    "linear_clipped_sum": lambda B, T, M, N, dt, dev: (torch.randn(B, T, M, dtype=dt, device=dev),
                                                       torch.randn(B, T, N, dtype=dt, device=dev),
                                                       torch.rand(B, dtype=torch.float32, device=dev)),
    "rows_colsum": lambda B, T, M, N, dt, dev: (torch.randn(B, T, M, dtype=dt, device=dev),),
    "rows_clipped_sum": lambda B, T, M, N, dt, dev: (torch.randn(B, T, M, dtype=dt, device=dev),
                                                     torch.rand(B, dtype=torch.float32, device=dev)),
    "persample_norm": lambda B, T, M, N, dt, dev: (torch.randn(B, M, N, dtype=dt, device=dev),),
    "persample_clipped_sum": lambda B, T, M, N, dt, dev: (torch.randn(B, M, N, dtype=dt, device=dev),
                                                          torch.rand(B, dtype=torch.float32, device=dev)),
    # one rows site, and two with the group's other norms
    "rows_group_clipped_sum": lambda B, T, M, N, dt, dev: (
        [torch.randn(B, M, dtype=dt, device=dev)] + ([torch.randn(B, N, dtype=dt, device=dev)] if B % 2 else []),
        # the other norms: none, (B,), or (B, N) parts of a weight's rows
        None if B % 2 == 0 else torch.rand(B, dtype=torch.float32, device=dev) if B == 1 else
        torch.rand(B, N, dtype=torch.float32, device=dev), 0.5, "abadi", True),
}
INPUTS["linear_ghost_norm"] = INPUTS["linear_tile_norm"] = INPUTS["linear_norm"]
INPUTS["linear_tile_clipped_sum"] = INPUTS["linear_clipped_sum"]
INPUTS["rows_norm"] = INPUTS["rows_colsum"]


def check_fake_matches(name: str, device: str, dtype: torch.dtype, B: int) -> None:
    op = getattr(torch.ops.dpcompile, name).default
    args = INPUTS[name](B, 5, 3, 4, dtype, device)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args))
    reals, fakes = (r if isinstance(r, (tuple, list)) else (r,) for r in (real, fake))
    assert len(reals) == len(fakes), name
    for r, f in zip(reals, fakes):
        assert (tuple(f.shape), f.stride(), f.dtype, f.device.type) == (tuple(r.shape), r.stride(), r.dtype,
                                                                        r.device.type), (name, dtype, B)


def test_every_op_with_its_own_fake_is_covered():
    assert ops_with_own_fake() == set(INPUTS)


@pytest.mark.parametrize("name", sorted(INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 3])
def test_fake_gives_the_body_s_metadata(name, dtype, B):
    check_fake_matches(name, "cpu", dtype, B)
