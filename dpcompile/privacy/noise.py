"""The Gaussian draw of DPOptimizer (optimizer.py), a mixin: fp32 noise whatever the parameter dtype, secure mode's
mean of four normal draws from a fresh OS-seeded generator every step, and one draw per device that noises and scales
every parameter's clipped sum with a few foreach kernels."""
from __future__ import annotations

import os
from typing import Optional

import torch


class GaussianNoise:
    """DPOptimizer's noise draw: reads `secure_mode` and `generator` of the optimizer."""

    def _noise(self, shape, device, std: float, gen) -> torch.Tensor:
        """N(0, std^2 I) of `shape` in fp32 on `device`, drawn on the generator's device. Scaled as it is drawn
        (normal_ computes std z in the draw's own pass; a draw and then a multiply was one more pass over every
        parameter's worth of noise, ~0.35 ms a step on gpt2-small, benchmarks/NOTES.md 37)."""
        gen_device = gen.device if gen is not None else device
        if self.secure_mode:  # mean of 4 unit normals, times 2: unit variance, no single float sample exposed
            z = torch.randn((4, *shape), generator=gen, device=gen_device, dtype=torch.float32).sum(0) * (std / 2)
        else:
            z = torch.empty(shape, device=gen_device, dtype=torch.float32).normal_(0.0, std, generator=gen)
        return z.to(device)

    def _step_generator(self, device) -> Optional[torch.Generator]:
        if not self.secure_mode:
            return self.generator
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return gen

    def _noise_params(self, params: list, device, std: float, scale: float, gen) -> None:
        """(g + N(0, std^2 I)) * scale for every parameter of one device from one draw and a few foreach kernels:
        a loop of per-parameter ops (a draw, casts, an add and a scale each) kept the host busy for as long as the
        compiled step itself took on gpt2-small (benchmarks/NOTES.md, entry 4). The draw is cut into the parameters'
        shapes by one call, and no per-parameter cast runs where the dtypes already agree (entry 19: ~150 views and
        ~150 no-op casts took 0.6 ms of host time a step)."""
        noise = self._noise((sum(p.numel() for p in params),), device, std * scale, gen)
        noisy = torch._utils._unflatten_dense_tensors(noise, params)  # views of the one draw, in parameter shapes
        sums = [p.grad for p in params]
        if not all(g is not None and g.dtype == torch.float32 for g in sums):
            sums = [torch.zeros(p.shape, device=device) if g is None else g.float() for p, g in zip(params, sums)]
        # std scale z + scale g written into the draw's own buffer: no new tensor per parameter (147 allocations a
        # step on gpt2-small, NOTES 33), and the clipped sums are left as they were (a caller may hold them)
        torch._foreach_add_(noisy, sums, alpha=scale)
        for p, g in zip(params, noisy):
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
