"""Custom ops for randomized (probe-estimated) per-sample norms, DP-SGD-RC (docs/randomized.md).

  draw_probe_seed(device) -> int64 (1,)
      A fresh secret 63-bit seed for one call of the graph, on `device`, from the module's seed source (OS
      entropy, `secrets`, unless `with manual_probe_seed(s):` fixed it for tests). Not an op of the graph: the
      backend appends an input for it, and the wrapper of each graph call draws one (backend._recording_clipping),
      so every call (every micro-batch) has its own seed, and under CUDA graphs a replay copies the call's seed
      into its input rather than replaying the one it captured. That the call's backward ran randomized norms is
      not recorded here: the graph call's clipping record says it, and it travels with the gradients the backward
      produced (clip_provenance.GraphClipping.runs, randomized_runs), where DPOptimizer reads it for its accountant.

  dpcompile::linear_norm_randomized(a, b, probes, variant, seed, site_id) -> (B,) fp32 (fp64 for fp64 data)
      Estimate of ||a_i^T b_i||_F^2 for a linear weight site (a (B, T, M), b (B, T, N), or (B, M) / (B, N) for
      T = 1, strided views allowed), the same operand convention as dpcompile::linear_norm. k = probes Gaussian
      probes, variant "hutchinson" (unbiased, relative std sqrt(2/k) at worst) or "hutchpp" (k products: k//3
      sketch, k - 2(k//3) residual probes; exact when rank(a_i^T b_i) <= k//3). Never rounded down (see
      kernels/randomized.py). seed: the int64 (1,) tensor of draw_probe_seed; site_id in [0, 2^31): distinct for every
      randomized site of the graph (the same seed is shared by the sites of one call). CUDA fp32/fp16/bf16:
      Triton kernels; elsewhere the PyTorch reference, with the same probes (so CPU and GPU agree).

  dpcompile::persample_norm_randomized(s, probes, variant, seed, site_id) -> (B,) fp32 (fp64 for fp64 data)
      The same estimate for per-sample products s (B, M, N) that are already formed: linear_norm_randomized of the
      site a_i = I_M, b_i = s_i (same probes, same law), without forming I_M. Batch-size-1 graphs use it on their
      weight-gradient products, so that every sample gets the same estimator whatever the size of its micro-batch
      (a sample clipped exactly in a batch of 1 and by estimate in a batch of 2 would break the analysis: adding a
      sample would change the law of the others' clipped gradients).

Only linear weight sites are randomized: bias, norm-affine and embedding norms cost O(B T d) exactly, as much as
the probes would, and stay on dpcompile::rows_norm / embedding_norm. A T = 1 linear site has the exact norm
||a_i||^2 ||b_i||^2, also cheaper than probes: the planner refuses to randomize it (the op still accepts it).

Test hook: inside `with exact_norms():` linear_norm_randomized returns the exact norm instead (read when the op
body runs: at trace time under Inductor, so compile inside the block, with a cache key that says so).
"""
from __future__ import annotations

import contextlib
import random
import secrets
import threading
from typing import Optional

import torch
from torch import Tensor

from ..randomized_contract import accounting_probes
from .kernels.randomized import (VARIANTS, _as_sites, check_site, check_variant, randomized_sq_norms,
                                 randomized_sq_norms_of_products, randomized_sq_norms_of_products_reference,
                                 randomized_sq_norms_reference)
from .ops import linear_norm_reference, persample_norm_reference
from .registry import dp_op

__all__ = ["VARIANTS", "linear_norm_randomized", "persample_norm_randomized", "draw_probe_seed", "next_probe_seed",
           "manual_probe_seed", "exact_norms", "exact_norms_enabled", "accounting_probes"]

# -- seed source ----------------------------------------------------------------------------------------------
class _SeedSource:
    """63-bit seeds: from `secrets` (OS entropy) by default, or from a seeded random.Random for tests."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rng: Optional[random.Random] = None

    def next(self) -> int:
        with self._lock:
            return self._rng.getrandbits(63) if self._rng is not None else secrets.randbits(63)

    def manual(self, seed: Optional[int]) -> Optional[random.Random]:
        """Follow `seed` (None: OS entropy); returns the generator it replaces."""
        return self.restore(None if seed is None else random.Random(seed))

    def restore(self, rng: Optional[random.Random]) -> Optional[random.Random]:
        with self._lock:
            prev, self._rng = self._rng, rng
        return prev


_SOURCE = _SeedSource()


def next_probe_seed() -> int:
    """A fresh probe seed in [0, 2^63)."""
    return _SOURCE.next()


@contextlib.contextmanager
def manual_probe_seed(seed: Optional[int]):
    """`with manual_probe_seed(s):` makes probe seeds reproducible inside the block (tests, debugging): the seed
    sequence follows `s` (None: OS entropy), and anyone who knows it knows the probes, which voids the privacy
    analysis (probes must be secret, like the noise). On leaving the block the seed source is what it was before,
    so nothing outlives the block."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an int or None")
    prev = _SOURCE.manual(seed)
    try:
        yield
    finally:
        _SOURCE.restore(prev)


def draw_probe_seed(device) -> Tensor:
    """A fresh secret seed as the int64 (1,) tensor the graphs' randomized norms read, on `device`."""
    seed = torch.tensor([next_probe_seed()], dtype=torch.int64)
    if torch.device(device).type == "cuda":
        # from pinned memory the copy is queued on the stream like a kernel; from pageable memory it would first wait
        # for the whole stream (a sync in mid-step, after which the GPU idles while the host catches up)
        return seed.pin_memory().to(device, non_blocking=True)
    return seed.to(device)


# -- test hook: exact norms -------------------------------------------------------------------------------------
_EXACT = threading.local()


def exact_norms_enabled() -> bool:
    return getattr(_EXACT, "on", False)


@contextlib.contextmanager
def exact_norms():
    """Make linear_norm_randomized return the exact squared norm (tests: the randomized path with the estimate
    replaced by the exact norm must give the exact path's gradients)."""
    prev = exact_norms_enabled()
    _EXACT.on = True
    try:
        yield
    finally:
        _EXACT.on = prev


# -- the norm op --------------------------------------------------------------------------------------------------
def _use_triton(*tensors: Tensor) -> bool:
    return tensors[0].device.type == "cuda" and torch.float64 not in {t.dtype for t in tensors}


def _exact(a: Tensor, b: Tensor) -> Tensor:
    a, b = _as_sites(a, b)
    if _use_triton(a, b):
        from .kernels.linear import per_sample_sq_norms

        return per_sample_sq_norms(a, b, launch=torch.library.wrap_triton)
    return linear_norm_reference(a, b)


@dp_op(role="norm")
def linear_norm_randomized(a: Tensor, b: Tensor, probes: int, variant: str, seed: Tensor, site_id: int) -> Tensor:
    check_variant(variant, probes)
    check_site(site_id)
    if exact_norms_enabled():
        return _exact(a, b)
    if _use_triton(a, b):
        return randomized_sq_norms(a, b, probes, variant, seed, site_id, launch=torch.library.wrap_triton)
    return randomized_sq_norms_reference(a, b, probes, variant, seed, site_id)


@dp_op(role="norm")
def persample_norm_randomized(s: Tensor, probes: int, variant: str, seed: Tensor, site_id: int) -> Tensor:
    check_variant(variant, probes)
    check_site(site_id)
    if exact_norms_enabled():
        return persample_norm_reference(s)
    if _use_triton(s):
        return randomized_sq_norms_of_products(s, probes, variant, seed, site_id, launch=torch.library.wrap_triton)
    return randomized_sq_norms_of_products_reference(s, probes, variant, seed, site_id)
