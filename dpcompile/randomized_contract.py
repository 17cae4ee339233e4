"""What the graphs' randomized norms and the privacy layer agree on (docs/randomized.md): the probe-count rule and
the record of randomized runs.

The second contract between the compiled graphs and the privacy layer, next to clip_provenance.py ("this gradient
was clipped with these thresholds"). Both sides import it, neither imports the other through it: codegen/ (the
dpcompile::probe_seed op records each run here) never imports privacy/, and privacy/ (PrivacyAccountant.step takes
the record, DPOptimizer peeks at it; randomized_accounting.py counts probes by accounting_probes) imports this
module at its top. No torch dependency, no import from the package.

The record of runs is process-wide on purpose: a PrivacyAccountant can be stepped by hand, with no model or
optimizer attached, and must still refuse to report a plain Gaussian ε for steps that ran randomized norms it was
not told about; only a process-wide record reaches it. `randomized_use` is that record (tests take it between
tests, tests/conftest.py).
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

__all__ = ["VARIANTS", "hutchpp_split", "check_variant", "accounting_probes", "RandomizedUse", "randomized_use",
           "record_randomized_use", "take_randomized_use", "peek_randomized_use"]

#: probe estimators of a per-sample squared norm: Hutchinson, and Hutch++ (a sketch, then Hutchinson on the rest)
VARIANTS = ("hutchinson", "hutchpp")


def hutchpp_split(probes: int) -> Tuple[int, int]:
    """(sketch probes s, residual probes h) of Hutch++ with `probes` = k matrix-vector products: s = k // 3
    sketch probes, s more products for ||s_i Q||^2, and h = k - 2 s >= k // 3 residual Hutchinson probes."""
    if probes < 3:
        raise ValueError(f"hutchpp needs probes >= 3, got {probes}")
    s = probes // 3
    return s, probes - 2 * s


def check_variant(variant: str, probes: int) -> None:
    """Refuse an unknown variant, a probe count that is not a positive integer, or too few probes for Hutch++."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {VARIANTS}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes={probes!r} must be a positive integer")
    if variant == "hutchpp":
        hutchpp_split(probes)


def accounting_probes(probes: int, variant: str = "hutchinson") -> int:
    """The Hutchinson-equivalent probe count the accountant uses for `probes` matrix-vector products (Hutch++:
    its residual probes; its sketch part is exact)."""
    check_variant(variant, probes)
    return hutchpp_split(probes)[1] if variant == "hutchpp" else probes


class RandomizedUse:
    """The effective probe counts of the randomized norms run since it was last taken (any thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: set = set()

    def record(self, probes: int, variant: str = "hutchinson") -> None:
        k = accounting_probes(probes, variant)
        with self._lock:
            self._counts.add(k)

    def take(self) -> Optional[Tuple[int, bool]]:
        with self._lock:
            counts, self._counts = self._counts, set()
        return _summary(counts)

    def peek(self) -> Optional[Tuple[int, bool]]:
        with self._lock:
            return _summary(set(self._counts))


def _summary(counts) -> Optional[Tuple[int, bool]]:
    if not counts:
        return None
    k = min(counts)
    return k, all(c % k == 0 for c in counts)


#: the process's record (module docstring)
randomized_use = RandomizedUse()


def record_randomized_use(probes: int, variant: str = "hutchinson") -> None:
    """Called by dpcompile::probe_seed each time a graph draws probe seeds."""
    randomized_use.record(probes, variant)


def take_randomized_use() -> Optional[Tuple[int, bool]]:
    """(smallest effective probe count, whether every count run is a multiple of it) for the randomized norms
    run since the last call, or None; and forget them. Counts that are not multiples of the smallest are outside
    the chi2 envelope's argument (a chi^2_mk / mk is a mean of m chi^2_k / k, other mixes are not): the
    accountant then uses the Chernoff envelope, which covers any mix."""
    return randomized_use.take()


def peek_randomized_use() -> Optional[Tuple[int, bool]]:
    """take_randomized_use() without forgetting."""
    return randomized_use.peek()
