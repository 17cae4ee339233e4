"""The same contract on a CUDA GPU: Inductor with CUDA code generation, bf16 autocast, the CUDA graph forms
(fused norm backward decompositions, index_put embedding backward). Skipped without a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dpcompile
import models
from dp_check import LossModule, assert_matches, oracle_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _on_cuda(case):
    case = copy.copy(case)
    case.model = copy.deepcopy(case.model)
    return case


@pytest.mark.parametrize("backend", ["flashdp", "flashdp_eager"])
@pytest.mark.parametrize("case", [models.gpt_like(tied=True), models.llama_like(), models.hf_gpt2(),
                                  models.mha()], ids=lambda c: c.name)
def test_cuda_fp32_matches_oracle(case, backend):
    got = _cuda_grads(case, case.batch(4, seed=1), backend, autocast=False, max_grad_norm=0.5,
                      clipping="per_layer", loss_reduction="mean")
    want = oracle_grads(case, case.batch(4, seed=1), max_grad_norm=0.5, clipping="per_layer")
    for name, w in want.items():
        torch.testing.assert_close(got[name].double().cpu(), w, atol=5e-5, rtol=5e-4, msg=name)


@pytest.mark.parametrize("dynamic_seq", [True, False])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("case", [models.gpt_like(tied=True, norm="rmsnorm", padding_idx=0),
                                  models.llama_like(d=16, n_head=4, n_kv_head=2)], ids=lambda c: c.name)
def test_cuda_bf16_autocast_close_to_oracle(case, clipping, dynamic_seq):
    """bf16 operands, fp32 norms: relative error of each clipped sum at bf16 level. dynamic_seq=False leaves the
    batch size the only symbolic size, so the graph keeps PyTorch's attention order (cuDNN first on Hopper)."""
    batch = case.batch(4, seed=2)
    got = _cuda_grads(case, batch, "flashdp", autocast=True, max_grad_norm=1e6, clipping=clipping,
                      loss_reduction="sum", dynamic_seq=dynamic_seq)
    want = oracle_grads(case, batch, max_grad_norm=1e6, clipping=clipping)
    for name, w in want.items():
        g = got[name].double().cpu()
        assert g.dtype == torch.float64 and got[name].dtype == torch.float32, name
        rel = (g - w).norm() / w.norm().clamp_min(1e-12)
        assert rel < 3e-2, f"{name}: relative error {rel:.3e}"


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_cuda_nested_compile_regions_are_inlined_and_exact(clipping):
    """Blocks marked with torch.compiler.nested_compile_region, through Inductor's CUDA code generation: the
    backend inlines the region bodies (backend.inline_compile_regions), so the norms span every block."""
    from test_false_refusals import CASES

    case = CASES["nested_compile_region"]()
    batch = case.batch(6, seed=3)
    got = _cuda_grads(case, batch, "flashdp", autocast=False, max_grad_norm=1e-2, clipping=clipping,
                      loss_reduction="mean")
    want = oracle_grads(case, batch, max_grad_norm=1e-2, clipping=clipping)
    for name, w in want.items():
        torch.testing.assert_close(got[name].double().cpu(), w, atol=1e-7, rtol=5e-4, msg=name)


def _cuda_grads(case, batch, backend, autocast, **options):
    model = copy.deepcopy(case.model).cuda()
    batch = tuple(b.cuda() for b in batch)
    wrapper = LossModule(model, case.loss_fn, options["loss_reduction"] == "mean")
    torch._dynamo.reset()
    compiled = dpcompile.compile(wrapper, backend=backend, **options)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = compiled(*batch)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gen", ["global", "cuda", "cpu", "secure"])
def test_dp_optimizer_noise_on_cuda_parameters(gen):
    from dpcompile import DPOptimizer

    model = torch.nn.Linear(128, 128).cuda()
    torch._dynamo.reset()
    compiled = dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum")
    compiled(torch.zeros(0, 128, device="cuda")).sum().backward()
    kw = {"global": {}, "secure": {"secure_mode": True},
          "cuda": {"generator": torch.Generator("cuda").manual_seed(0)},
          "cpu": {"generator": torch.Generator().manual_seed(0)}}[gen]
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=2.0,
                      expected_batch_size=4.0, **kw)
    opt.add_noise()
    g = model.weight.grad
    assert g.device.type == "cuda" and abs(g.std().item() / 0.5 - 1) < 0.03


@pytest.mark.parametrize("compiled", [False, True])
def test_two_pass_norms_the_products_it_sums(compiled):
    """two_pass forms each sample's product twice (cuBLAS bmm for the norm, again for the clipped sum): the clip
    bound holds only if both passes produce the same values. With coef = e_i the clipped sum is sample i's second-
    pass product itself (one fp32 term, rounded once to bf16), and its norm must be the first pass's norm."""
    g = torch.Generator("cuda").manual_seed(0)
    B, T, M, N = 4, 256, 768, 2304  # gpt2-small's qkv site
    a = torch.randn(B, T, M, device="cuda", generator=g).bfloat16()
    b = torch.randn(B, T, N, device="cuda", generator=g).bfloat16() * 1e-2
    eye = torch.eye(B, device="cuda")

    def passes(a, b, eye):
        n2 = torch.ops.dpcompile.linear_tile_norm(a, b)
        second = [torch.ops.dpcompile.linear_tile_clipped_sum(a, b, eye[i]) for i in range(B)]
        return n2, torch.stack(second)

    fn = torch.compile(passes) if compiled else passes
    torch._dynamo.reset()
    n2, second = fn(a, b, eye)
    again = second.float().pow(2).sum((1, 2))
    torch.testing.assert_close(n2, again, rtol=1e-5, atol=0)  # fp32 summation order only
    exact = torch.bmm(a.double().transpose(1, 2), b.double()).pow(2).sum((1, 2))
    torch.testing.assert_close(n2.double(), exact, rtol=1e-2, atol=0)  # bf16 products: about 2^-8 each


def test_reduce_overhead_cuda_graphs_match_the_default_mode_over_steps():
    """mode="reduce-overhead" (issue 21 item 2): the DP graphs replayed from CUDA graphs give the clipped sums of
    the default mode at every step, through DPOptimizer steps (the parameters change in place under the recorded
    graphs) and a change of batch size (a second recording); no graph skipped CUDA graphs."""
    from torch._dynamo.utils import counters

    case = models.gpt_like(tied=True)
    runs = []
    for mode in ("reduce-overhead", None):
        model = copy.deepcopy(case.model).cuda()
        torch._dynamo.reset()
        counters.clear()
        compiled = dpcompile.compile(LossModule(model, case.loss_fn, False), mode=mode, max_grad_norm=0.5,
                                     clipping="per_layer", loss_reduction="sum")
        opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), noise_multiplier=0.0,
                                    max_grad_norm=0.5, expected_batch_size=4.0, loss_reduction="sum")
        grads = []
        for step, B in enumerate([4, 4, 4, 3, 3, 4]):
            compiled(*(b.cuda() for b in case.batch(B, seed=step))).backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
        runs.append((grads, dict(counters["inductor"])))
    (cuda_graphs, inductor), (default, _) = runs
    assert inductor.get("cudagraph_skips", 0) == 0, inductor
    for step, (a, b) in enumerate(zip(cuda_graphs, default)):
        for name in b:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")


def test_randomized_norms_under_cuda_graphs_draw_every_call_its_own_seed():
    """Randomized norms under mode="reduce-overhead": the probe seed is a graph input, so each replay of the
    recorded graphs estimates with its own call's seed. The same seed sequence (manual_probe_seed) through the
    default mode gives the same gradients at every step, and the steps' gradients differ (the seeds do): a replay of
    the captured seed would give every step step 0's gradients."""
    from torch._dynamo.utils import counters

    from dpcompile.codegen.randomized_ops import manual_probe_seed

    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).cuda()
    x = torch.randn(4, 32, 16, device="cuda")
    runs = []
    for mode in ("reduce-overhead", None):
        model = copy.deepcopy(model0)
        torch._dynamo.reset()
        counters.clear()
        compiled = dpcompile.compile(model, mode=mode, max_grad_norm=0.05, strategy="randomized", probes=4,
                                     loss_reduction="sum")
        grads = []
        with manual_probe_seed(11):
            for _ in range(4):
                model.zero_grad(set_to_none=True)
                compiled(x).pow(2).sum().backward()
                grads.append([p.grad.detach().clone() for p in model.parameters()])
        runs.append((grads, dict(counters["inductor"])))
    (cuda_graphs, inductor), (default, _) = runs
    assert inductor.get("cudagraph_skips", 0) == 0, inductor
    for step, (a, b) in enumerate(zip(cuda_graphs, default)):
        for k, (ga, gb) in enumerate(zip(a, b)):
            torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4, msg=f"step {step}: parameter {k}")
    assert not torch.equal(cuda_graphs[2][0], cuda_graphs[3][0])  # replays, each with its own seed


def test_embedding_norm_does_not_wait_for_the_gpu():
    """The embedding site's per-sample norm takes no host sync (a sync stalls the step's launch queue at every
    embedding site): sort and segment sums into B*T slots, no torch.unique or boolean-mask indexing."""
    from dpcompile.codegen import ops

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (3, 9), generator=gen).cuda()
    g = torch.randn(3, 9, 5, generator=gen).cuda()
    want = ops.embedding_norm_reference(idx.cpu().double(), g.cpu().double(), 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.embedding_norm_reference(idx, g, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_fakes_give_the_kernels_metadata(dtype):
    """dp_op(fake=...): the metadata functions against the Triton kernels' outputs (test_op_fakes.py: CPU bodies)."""
    from test_op_fakes import INPUTS, check_fake_matches

    for name in sorted(INPUTS):
        for B in (0, 1, 3):
            check_fake_matches(name, "cuda", dtype, B)


