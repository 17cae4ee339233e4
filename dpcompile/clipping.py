"""The clip factor of the gradient contract, shared by the rewritten graph and the single-pass op."""
from __future__ import annotations

import torch

from .options import AUTO_GAMMA, CLIP_EPS


def clip_factors(sq_norms: torch.Tensor, threshold: float, clip_fn: str) -> torch.Tensor:
    """c_i = min(1, C/(||g_i|| + eps)) ("abadi") or C/(||g_i|| + gamma) ("automatic"), from squared norms."""
    norms = sq_norms.clamp_min(0).sqrt()
    if clip_fn == "abadi":
        return (threshold / (norms + CLIP_EPS)).clamp(max=1.0)
    return threshold / (norms + AUTO_GAMMA)
