"""What the graphs' randomized norms and the privacy layer agree on (docs/randomized.md): the probe-count rule and
how the probe counts that produced a step's gradients are summed up for the accountant.

The second contract between the compiled graphs and the privacy layer, next to clip_provenance.py ("this gradient
was clipped with these thresholds"). Both sides import it, neither imports the other through it: codegen/ (the
randomized norm ops check their probe counts here) and clip_provenance.py (each graph call's record says with how
many effective probes its backward estimated norms) never import privacy/, and privacy/ (randomized_accounting.py
counts probes by accounting_probes; PrivacyAccountant.step sums up the counts it is told with probes_summary)
imports this module at its top. No torch dependency, no import from the package.

There is no record of runs here: "this backward ran randomized norms with k probes" is a fact about the gradients
that backward produced, and it travels with them (clip_provenance.randomized_runs). DPOptimizer reads it from the
gradients it steps and tells its accountant (PrivacyAccountant.step(..., probes_ran=...)); whoever steps a
PrivacyAccountant by hand tells it the same way.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

__all__ = ["VARIANTS", "hutchpp_split", "check_variant", "accounting_probes", "probes_summary"]

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


def probes_summary(counts: Iterable[int]) -> Optional[Tuple[int, bool]]:
    """(smallest effective probe count, whether every count is a multiple of it) of the effective probe counts of
    the randomized norms that produced one step's gradients, or None for none. Counts that are not multiples of the
    smallest are outside the chi2 envelope's argument (a chi^2_mk / mk is a mean of m chi^2_k / k, other mixes are
    not): the accountant then uses the Chernoff envelope, which covers any mix."""
    counts = set(counts)
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"effective probe count {c!r} must be a positive integer")
    if not counts:
        return None
    k = min(counts)
    return k, all(c % k == 0 for c in counts)
