"""Randomized norms on the GPU: bf16, tensor-core products, Inductor, no synchronisation, products vs rows."""
from __future__ import annotations

import pytest
import torch

from dpcompile.codegen import randomized_ops as RO
from dpcompile.codegen.kernels import randomized as K
from randomized_common import SEED, _exact, _low_rank, _Bilinear


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", K.VARIANTS)
def test_gpu_bf16_and_default_blocks(variant):
    g = torch.Generator().manual_seed(20)
    for B, T, M, N in ((3, 300, 256, 96), (2, 1, 33, 65), (4, 129, 70, 200)):
        a = torch.randn(B, T, M, generator=g).cuda().bfloat16()
        b = torch.randn(B, T, N, generator=g).cuda().bfloat16()
        got = K.randomized_sq_norms(a, b, 24, variant, SEED, 1).cpu().double()
        want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 24, variant, SEED, 1, dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    a, b = _low_rank(2, 64, 128, 96, 3, g, torch.bfloat16)
    torch.testing.assert_close(K.randomized_sq_norms(a, b, 12, "hutchpp", SEED, 0).cpu().double(),
                               _exact(a.cpu(), b.cpu()), rtol=2e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_tensor_core_products_match_ieee_fp32(dtype):
    """tf32x3 (the default) against IEEE fp32 FMAs with the same probes, at a long T where the row slices split:
    the two differ by fp32-sized rounding only, far inside the estimator's own spread."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(2, 4096, 768, generator=g).cuda().to(dtype)
    b = torch.randn(2, 4096, 96, generator=g).cuda().to(dtype)
    assert K._splits(2, 4096, 6, 64, None) > 1  # b^T z over the 768 columns, in 6 tiles
    fast = K.randomized_sq_norms(a, b, 32, "hutchinson", SEED, 4)
    ieee = K.randomized_sq_norms(a, b, 32, "hutchinson", SEED, 4, precision="ieee", splits=1)
    torch.testing.assert_close(fast, ieee, rtol=2e-5, atol=0)
    want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 32, "hutchinson", SEED, 4, dtype=torch.float64)
    torch.testing.assert_close(fast.cpu().double(), want, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_probes_and_inductor():
    torch.testing.assert_close(K.dump_probes(SEED, 3, 4, 300, 0, 40, "cuda").cpu(),
                               K.gaussian_probes_reference(SEED, 3, 4, 300, range(40)), rtol=0, atol=1e-5)
    a = torch.randn(3, 77, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3, 77, 48, device="cuda", dtype=torch.bfloat16)

    def f(a, b, seed):
        return torch.ops.dpcompile.linear_norm_randomized(a, b, 16, "hutchinson", seed, 0), seed

    got, seed = torch.compile(f, backend="inductor")(a, b, RO.draw_probe_seed("cuda"))
    want = K.randomized_sq_norms_reference(a.cpu(), b.cpu(), 16, "hutchinson", seed.cpu(), 0, dtype=torch.float64)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_probe_seed_does_not_synchronize():
    """The per-step seed reaches the GPU by a copy queued on the stream: a pageable copy would wait for the whole
    stream in mid-step (run 19's profile: 3 ms of idle GPU a step)."""
    RO.draw_probe_seed("cuda")  # the pinned-memory pool's first block
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seeds = [RO.draw_probe_seed("cuda") for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len({int(s.item()) for s in seeds}) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", K.VARIANTS)
def test_gpu_products_estimate_with_the_sites_probes(variant):
    """randomized_stored's estimate on the GPU (bf16 products, tensor cores, eager and through Inductor) against the
    fp64 reference with the same probes, and against the rows' estimate of the same site."""
    g = torch.Generator().manual_seed(22)
    a = torch.randn(2, 300, 64, generator=g).cuda().bfloat16()
    b = torch.randn(2, 300, 96, generator=g).cuda().bfloat16()
    s = torch.bmm(a.transpose(1, 2), b)  # (2, 64, 96) bf16, as the vendor GEMM stores them
    want = K.randomized_sq_norms_of_products_reference(s.cpu().double(), 24, variant, SEED, 1, dtype=torch.float64)
    torch.testing.assert_close(K.randomized_sq_norms_of_products(s, 24, variant, SEED, 1).cpu().double(), want,
                               rtol=1e-4, atol=0)
    op = torch.compile(lambda s, seed: torch.ops.dpcompile.persample_norm_randomized(s, 24, variant, seed, 1),
                       backend="inductor")
    torch.testing.assert_close(op(s, torch.tensor([SEED], device="cuda")).cpu().double(), want, rtol=1e-4, atol=0)
    rows = K.randomized_sq_norms(a, b, 24, variant, SEED, 1).cpu().double()
    torch.testing.assert_close(rows, want, rtol=2e-2, atol=0)  # the products' bf16 rounding apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_step_from_products_or_rows_alike():
    """The same seed gives the same clipped gradient through Inductor whether the site is probed on its stored
    products (default budget) or on its rows (a budget nothing fits)."""
    import dpcompile

    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(4, 64, 6, generator=g).cuda(), torch.randn(4, 64, 4, generator=g).cuda()
    grads = []
    for budget in ({}, {"single_pass_budget_mb": 1e-4}):
        model = _Bilinear().cuda()
        torch.manual_seed(0)
        torch.nn.init.normal_(model.lin.weight)
        torch._dynamo.reset()
        compiled = dpcompile.compile(model, backend="flashdp", loss_reduction="sum", clipping="flat",
                                     max_grad_norm=0.3, strategy="randomized", probes=8, **budget)
        with RO.manual_probe_seed(5):
            compiled(x, w).backward()
        grads.append(model.lin.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
