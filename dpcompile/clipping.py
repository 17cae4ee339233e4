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


def group_clip_factors(sq_norms: torch.Tensor, threshold: float, clip_fn: str, mean: bool, batch) -> torch.Tensor:
    """The factors the clipped sums take, from a group's squared norms of the gradients of the loss as written:
    under the mean reduction the loss carried 1/B, so the norms and the sums are of B * g_i."""
    if mean:
        sq_norms = sq_norms * (batch * batch)
    coef = clip_factors(sq_norms, threshold, clip_fn)
    return coef * batch if mean else coef
