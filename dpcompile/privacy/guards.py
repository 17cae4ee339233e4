"""What DPOptimizer refuses around a step (issue 22): gradients of two logical batches, a step past the target ε,
a sample rate the loader did not draw with.

The loaders (DPDataLoader, BatchMemoryManager, PoissonDataLoader) tell the optimizer, before they hand out a
batch, which logical batch it belongs to (its draw number in the sampler's stream) and whether it is the last
physical batch of it (`DPOptimizer.note_physical_batch`). From that the optimizer knows where logical batches
end: a step() on a physical batch that is not the last one returns without stepping (BatchMemoryManager's loop),
and a step() over gradients that two logical batches left in .grad is refused.

A run planned for a target ε (make_private(target_epsilon=...)) records its plan (σ, q, steps, target, δ). A step
within the plan is allowed at once when every step so far and this one had σ >= the plan's and q <= the plan's
(ε grows with q and falls with σ); otherwise the accountant's own ε decides, through the number of further steps
at the current (σ, q) that keep ε <= target (searched once per change of σ or q, not at every step).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..errors import DPCompileError

__all__ = ["LogicalBatchError", "PrivacyBudgetExceeded", "LogicalBatchState", "steps_within_budget"]


class LogicalBatchError(DPCompileError):
    """A step that would not be one DP-SGD step over one Poisson logical batch (two logical batches in .grad, a
    second step for one logical batch, an unfinished one, or a sample rate the loader did not draw with)."""


class PrivacyBudgetExceeded(DPCompileError):
    """The next step would take ε past the target the run was planned for."""


@dataclasses.dataclass
class LogicalBatchState:
    """Where the loaders' batches stand, as the optimizer was told (all None / defaults when no loader tells)."""
    open: Optional[int] = None          #: draw number of the logical batch whose batches are being handed out
    index: int = 0                      #: physical batches of it handed out so far, minus one
    handed: int = 0                     #: micro-batches of it handed out so far (a list of several counts each)
    last: bool = True                   #: the latest physical batch is the last of its logical batch
    sample_rate: Optional[float] = None  #: the q that logical batch was drawn with
    stepped: Optional[int] = None       #: draw number of the last logical batch a step() stepped on
    skip_pending: bool = False          #: the latest step() returned without stepping (inside a logical batch)
    mixed: Optional[tuple] = None       #: (earlier draw or None, later draw) whose gradients are both in .grad
    cut: Optional[int] = None           #: a logical batch the loop left before its last physical batch


def steps_within_budget(history: list, sigma: float, sample_rate: float, spec, target_epsilon: float, delta: float,
                        accountant: str, value_discretization_interval: Optional[float],
                        cap: int = 1 << 24) -> tuple:
    """(k, ε after one more step): k = the largest number of further steps at (σ, q[, randomized spec]) after
    `history` whose ε at `delta` is <= target_epsilon (0 when the next step would exceed it; `cap` at most).
    ε is the accountant's own (`_history_epsilon`), by an exponential then a bisection search on k."""
    from .accounting import _history_epsilon

    def eps(k: int) -> float:
        return _history_epsilon(list(history) + [(sigma, sample_rate, k, spec)], delta, accountant,
                                value_discretization_interval)

    first = eps(1)
    if not first <= target_epsilon:
        return 0, first
    lo, hi = 1, 2
    while hi <= cap and eps(hi) <= target_epsilon:
        lo, hi = hi, 2 * hi
    if hi > cap:
        return cap, first
    while hi - lo > 1:  # eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        if eps(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo, first


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b)) or (math.isnan(a) and math.isnan(b))
