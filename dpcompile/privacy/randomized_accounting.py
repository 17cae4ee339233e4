"""Privacy accounting for randomized (probe-estimated) per-sample norms, DP-SGD-RC (docs/randomized.md).

With an estimate n^_i of n_i = ||g_i||^2 the clipped gradient c_i g_i, c_i = min(1, C / sqrt(n^_i)), has norm at most
C / sqrt(min(R_i, 1)), R_i = n^_i / n_i: the sensitivity is a random variable. Its direction is fixed (c_i is a
scalar), the probes of a sample are independent of everything else, so one step is a Gaussian mechanism with a
random sensitivity: a mixture of Gaussians (MoG). Accounted here:

1. Law of R. With k Gaussian probes, R = sum_j w_j Y_j, Y_j iid chi^2_k / k, w on the simplex (normalised squared
   singular values of the group's per-sample gradients; sites with exact norms add a constant w_0 with Y = 1).
   Envelope: P(R <= r) <= F(r) for every weighting.
     "chi2" (default): F = CDF of chi^2_k / k, the rank-one case (the issue's envelope). For r <= 1 the rank-one
        weighting maximises P(R <= r): the CDFs of two weighted sums of iid gamma variables (shape k/2 >= 1) whose
        weights are ordered by majorisation cross exactly once (Diaconis-Perlman unique-crossing conjecture,
        proved for shape >= 1: Y. Yu, zbMATH 1382.60045), rank-one lies above near 0, and it is still above at
        r = 1 (the mean), which second-order expansion and tests/test_randomized.py check numerically; so it is
        above on all of (0, 1]. Only r < 1 matters below (R >= 1 means sensitivity <= C).
     "chernoff": F(r) = (r e^(1-r))^(k/2), the Chernoff bound of the rank-one case, which bounds every
        weighting with an elementary proof (prod_j (1 + 2 t w_j / k)^(-k/2) <= (1 + 2 t / k)^(-k/2)). Looser.
   Hutch++ with k products is accounted with its h = k - 2 floor(k/3) >= floor(k/3) residual probes: its ratio is
   w_0 + sum_j w_j Y_j with Y_j ~ chi^2_h / h (the exact part is a constant), the same family as Hutchinson's.
2. Tail. R < r_min has probability <= tau (per sample and step, all groups together) and unbounded sensitivity.
   It is cut off: the mechanism M' that redraws R from its law conditioned on R >= r_min agrees with M except on
   an event of probability <= a = sum over steps of q tau, and M(D)(S) >= (1 - tau)^steps M'(D)(S). Hence
   eps(delta) <= eps'(delta - a) + b with b = -steps log(1 - tau) (eps' the PLD epsilon of M'). The conditioned law
   is dominated by P(R' < r) = min(1, F(r) / (1 - tau)) on (r_min, 1) with an atom at r_min.
3. Discretisation, pessimistic: R' is put on bins, each at its smallest R (largest sensitivity), so the
   sensitivity law used stochastically dominates the true one. A MoG whose sensitivities dominate another's
   dominates it in privacy (embed the smaller one in 2-D with the same norm as the larger; the vector MoG is
   dominated by the scalar MoG of the norms, Choquette-Choo et al. 2023, Cor. 4.7, as in dp_accounting).
4. Per-layer groups. Group g clipped to C_g (w_g = C_g^2 / C^2, sum 1) has R_g independent across groups and
   S^2 / C^2 = sum_g w_g / min(R_g, 1) = 1 + sum_g w_g E_g, E_g = 1 / min(R_g, 1) - 1. The law of the sum is
   convolved on a lattice, rounding every value up (groups with equal weights by repeated squaring), then
   compressed to a few hundred MoG components, again rounding up.
5. Poisson sampling: sensitivities [0, s_1, ...] with probabilities [1 - q, q p_1, ...] in dp_accounting's
   MixtureOfGaussiansDpEvent (PLD accountant, add and remove neighbours).

The probes are modelled as exact Gaussians; the kernels draw Philox + Box-Muller fp32 normals (truncated at
|z| <= 6.66, i.e. at probability 2^-32 per entry). This module has no torch dependency (it is imported by the
accountant); dp_accounting / scipy are imported lazily. The probe-count rule (accounting_probes) and the summary of
the probe counts that produced a step's gradients (probes_summary) come from dpcompile/randomized_contract.py, which
the graphs share.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

# the probe-count rule is shared with the graphs: it lives in the contract module
from ..randomized_contract import VARIANTS, accounting_probes, probes_summary

__all__ = ["ENVELOPES", "VARIANTS", "RandomizedSpec", "accounting_probes", "envelope_cdf", "sensitivity_law",
           "mog_event", "tail_probability", "probes_summary"]

ENVELOPES = ("chi2", "chernoff")
DEFAULT_ENVELOPE = "chi2"

#: fraction of δ given to the cut-off tail: a = steps·q·τ = TAIL_FRACTION·δ
TAIL_FRACTION = 1e-3
#: the largest sensitivity (in units of C) the cut-off may need; fewer probes than that allows are refused
MAX_SENSITIVITY = 40.0
#: fewest (effective) probes accounted: the envelope argument needs chi^2 shape k/2 >= 1
MIN_PROBES = 2
#: MoG components after compression: geometric in sensitivity + quantiles of the law
GEOMETRIC_BINS = 60
QUANTILE_BINS = 120
#: fine grid of R per group before compression, and lattice length for per-layer convolutions
FINE_BINS = 2000
LATTICE = 8192


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class RandomizedSpec:
    """What the accountant needs about one step's randomized norms.

    probes: effective (Hutchinson-equivalent) probe count, the smallest of any randomized site of the step.
    group_weights: None for one clipping group (flat clipping, or per-layer with a single group); else C_g^2 / C^2
        of every clipping group that holds a randomized site (groups with exact norms only are left out; the
        weights of all groups sum to 1).
    envelope: "chi2" or "chernoff" (module docstring)."""
    probes: int
    group_weights: Optional[Tuple[float, ...]] = None
    envelope: str = DEFAULT_ENVELOPE

    def __post_init__(self):
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < MIN_PROBES:
            raise ValueError(f"probes={self.probes!r}: randomized norms are accounted for >= {MIN_PROBES} "
                             "(effective) probes")
        if self.envelope not in ENVELOPES:
            raise ValueError(f"envelope={self.envelope!r} is unknown; use one of {ENVELOPES}")
        if self.group_weights is not None:
            w = tuple(float(x) for x in self.group_weights)
            if not w or any(not (x > 0 and math.isfinite(x)) for x in w) or sum(w) > 1 + 1e-9:
                raise ValueError(f"group_weights={self.group_weights!r} must be positive fractions C_g^2 / C^2 "
                                 "summing to at most 1")
            object.__setattr__(self, "group_weights", w)

    @classmethod
    def make(cls, probes: int, variant: str = "hutchinson", group_weights: Optional[Sequence[float]] = None,
             envelope: str = DEFAULT_ENVELOPE) -> "RandomizedSpec":
        gw = None if group_weights is None else tuple(float(x) for x in group_weights)
        if gw is not None and len(gw) == 1 and abs(gw[0] - 1.0) <= 1e-12:
            gw = None  # one group holding the whole threshold: the flat law
        return cls(accounting_probes(probes, variant), gw, envelope)

    def to_json(self) -> dict:
        return {"probes": self.probes, "group_weights": None if self.group_weights is None else
                list(self.group_weights), "envelope": self.envelope}

    @classmethod
    def from_json(cls, d: dict) -> "RandomizedSpec":
        gw = d.get("group_weights")
        return cls(int(d["probes"]), None if gw is None else tuple(gw), d.get("envelope", DEFAULT_ENVELOPE))


# ------------------------------------------------------------------------------------------------ envelope
def envelope_cdf(r, probes: int, envelope: str = DEFAULT_ENVELOPE):
    """F(r) >= P(R <= r) for every weighting of `probes` Gaussian probes (numpy array in, array out), r <= 1."""
    import numpy as np
    from scipy import special

    r = np.asarray(r, dtype=np.float64)
    k = probes
    if envelope == "chi2":
        return special.gammainc(k / 2, np.maximum(r, 0) * k / 2)  # regularised lower incomplete gamma
    if envelope == "chernoff":
        with np.errstate(divide="ignore"):
            log = (k / 2) * (np.log(np.maximum(r, 0)) + 1 - r)
        return np.where(r >= 1, 1.0, np.exp(np.minimum(log, 0)))
    raise ValueError(f"envelope={envelope!r} is unknown; use one of {ENVELOPES}")


def _envelope_quantile(tau: float, probes: int, envelope: str) -> float:
    """r_min with F(r_min) = tau (F continuous and increasing on (0, 1))."""
    from scipy import optimize, special

    k = probes
    if envelope == "chi2":
        r = float(special.gammaincinv(k / 2, tau)) * 2 / k
        if r > 0 and math.isfinite(r):
            return r
    # log F is increasing on (0, 1): bisect it
    lt = math.log(tau)

    def f(x):
        if envelope == "chi2":
            return math.log(max(float(special.gammainc(k / 2, x * k / 2)), 1e-320)) - lt
        return (k / 2) * (math.log(x) + 1 - x) - lt

    return optimize.brentq(f, 1e-300, 1 - 1e-15, xtol=1e-300, rtol=1e-14)


def _envelope_quantiles(levels, probes: int, envelope: str):
    """r with F(r) = level for each level in (0, F(1)) (vectorised)."""
    import numpy as np
    from scipy import special

    levels = np.asarray(levels, dtype=np.float64)
    k = probes
    if envelope == "chi2":
        return special.gammaincinv(k / 2, levels) * 2 / k
    # (r e^(1-r))^(k/2) = p  <=>  r = -W0(-p^(2/k) / e)
    return np.real(-special.lambertw(-np.power(levels, 2 / k) / math.e, 0))


def _group_law(probes: int, tau: float, envelope: str):
    """Dominating law of 1 / min(R, 1) for one group, R conditioned on R >= r_min (tail tau): (values, probs),
    values ascending (1 first), probabilities summing to 1, every value rounded up."""
    import numpy as np

    r_min = _envelope_quantile(tau, probes, envelope)
    s_max = 1 / math.sqrt(r_min)
    if s_max > MAX_SENSITIVITY:
        raise ValueError(
            f"{probes} (effective) probes are too few at this delta: the cut-off tail P(R < r_min) = {tau:.3g} "
            f"needs sensitivities up to {s_max:.1f} C (limit {MAX_SENSITIVITY:g}); use more probes")
    f1 = float(envelope_cdf(1.0, probes, envelope))
    # fine edges of R from 1 down to r_min: geometric in sensitivity and uniform in probability
    r_geo = 1 / np.geomspace(1.0, s_max, FINE_BINS + 1) ** 2
    r_q = _envelope_quantiles(np.linspace(tau, min(f1, 1 - 1e-9), FINE_BINS + 1)[1:-1], probes, envelope)
    edges = np.unique(np.concatenate([r_geo, r_q, [1.0, r_min]]))[::-1]  # 1 = r_0 > ... > r_m = r_min
    edges = edges[(edges <= 1.0) & (edges >= r_min)]
    G = np.minimum(1.0, envelope_cdf(edges, probes, envelope) / (1 - tau))  # P(R' < r), r > r_min
    G[-1] = 0.0                                                           # nothing below the atom at r_min
    probs = G[:-1] - G[1:]                                                # bin [r_{j+1}, r_j)
    values = 1 / edges[1:]                                                # its largest 1 / R
    p_one = 1.0 - G[0]                                                    # R' >= 1: 1 / min(R, 1) = 1
    values = np.concatenate([[1.0], values])
    probs = np.concatenate([[p_one], probs])
    keep = probs > 0
    return values[keep], probs[keep] / probs[keep].sum()


def _round_up_to_lattice(values, probs, h):
    """pmf on the lattice 0, h, 2h, ... of the law (values >= 0, probs), every value moved up to a lattice point."""
    import numpy as np

    idx = np.ceil(values / h).astype(np.int64)
    idx = idx + (idx * h < values)  # guard the division's rounding: idx * h >= value always
    out = np.zeros(int(idx.max()) + 1)
    np.add.at(out, idx, probs)
    return out


def _rebin(pmf, h):
    """Halve the resolution, rounding values up: index j -> ceil(j / 2)."""
    import numpy as np

    n = len(pmf)
    out = np.zeros(n // 2 + 1)
    out[0] = pmf[0]
    odd = pmf[1::2]
    even = pmf[2::2]
    out[1:1 + len(odd)] += odd
    out[1:1 + len(even)] += even
    return np.trim_zeros(out, "b"), 2 * h


def _convolve(p1, p2, h):
    """Law of the sum of two independent variables on one lattice of step h, rebinned up to <= LATTICE points:
    (pmf, step)."""
    import numpy as np

    out = np.maximum(np.convolve(p1, p2), 0.0)
    while len(out) > LATTICE + 1:
        out, h = _rebin(out, h)
    return out, h


def _power(base, h, count):
    """Law of the sum of `count` iid copies of a lattice variable (repeated squaring, rebinning up)."""
    import numpy as np

    acc, acc_h = np.array([1.0]), h  # the sum of no variables
    power, power_h = base, h
    n = count
    while n:
        if n & 1:
            while acc_h < power_h:
                acc, acc_h = _rebin(acc, acc_h)
            while power_h < acc_h:
                power, power_h = _rebin(power, power_h)
            acc, acc_h = _convolve(acc, power, acc_h)
        n >>= 1
        if n:
            power, power_h = _convolve(power, power, power_h)
    return acc, acc_h


def _excess_law(spec: RandomizedSpec, tau: float):
    """(values, probs) of S^2 / C^2 (>= 1), rounded up, for a spec with group weights."""
    import numpy as np

    weights = spec.group_weights
    vals, probs = _group_law(spec.probes, tau / len(weights), spec.envelope)  # union bound over the groups
    excess = vals - 1.0                       # E = 1 / min(R, 1) - 1 >= 0
    h0 = max(float(excess.max()), 1e-12) / LATTICE
    base = np.trim_zeros(_round_up_to_lattice(excess, probs, h0), "b")
    classes = {}
    for w in weights:
        classes[w] = classes.get(w, 0) + 1
    # each class of equal weights: the sum of its iid E by repeated squaring, then scaled by the weight
    parts = []
    for w, count in classes.items():
        pmf, h = _power(base, h0, count)
        parts.append((np.arange(len(pmf)) * h * w, pmf))
    # the classes together on one lattice of the weighted excess
    h = max(sum(float(v[-1]) for v, _ in parts), 1e-12) / LATTICE
    total = np.array([1.0])
    for v, p in parts:
        lat = np.trim_zeros(_round_up_to_lattice(v, p, h), "b")
        total, h = _convolve(total, lat, h)  # a rebin doubles h for the classes after it too
    values = 1.0 + np.arange(len(total)) * h
    keep = total > 0
    return values[keep], total[keep] / total[keep].sum()


def _compress(values, probs, s_bins: int = GEOMETRIC_BINS, q_bins: int = QUANTILE_BINS):
    """At most s_bins + q_bins + 1 sensitivities: consecutive support points merged, each bin at its largest
    value (values are S^2 / C^2, ascending). Returns (sensitivities S / C, probabilities)."""
    import numpy as np

    s = np.sqrt(values)
    cdf = np.cumsum(probs)
    geo = np.geomspace(1.0, max(float(s[-1]), 1.0 + 1e-12), s_bins + 1)
    # upper edges: every geometric edge and every quantile level, as indices of the last point in the bin
    idx_geo = np.searchsorted(s, geo, side="right") - 1
    idx_q = np.searchsorted(cdf, np.linspace(0, 1, q_bins + 1)[1:-1], side="left")
    last = np.unique(np.concatenate([idx_geo, idx_q, [0, len(s) - 1]]))
    last = last[(last >= 0) & (last < len(s))]
    first = np.concatenate([[0], last[:-1] + 1])
    p = np.array([probs[a:b + 1].sum() for a, b in zip(first, last)])
    sens = s[last]
    keep = p > 0
    return sens[keep], p[keep] / p[keep].sum()


def sensitivity_law(spec: RandomizedSpec, tau: float):
    """Pessimistic law of the per-sample sensitivity S / C given that no sample's R fell below its cut-off:
    (sensitivities >= 1, probabilities summing to 1), as numpy arrays."""
    if not 0 < tau < 1e-2:
        raise ValueError(f"tail probability tau={tau!r} must be in (0, 0.01)")
    if spec.group_weights is None:
        values, probs = _group_law(spec.probes, tau, spec.envelope)
    else:
        values, probs = _excess_law(spec, tau)
    return _compress(values, probs)


@functools.lru_cache(maxsize=64)
def _cached_law(spec: RandomizedSpec, tau: float):
    return sensitivity_law(spec, tau)


def mog_event(noise_multiplier: float, sample_rate: float, spec: RandomizedSpec, tau: float):
    """One Poisson-sampled step with randomized norms as dp_accounting's MixtureOfGaussiansDpEvent (units of C)."""
    from dp_accounting import dp_event

    sens, probs = _cached_law(spec, tau)
    q = float(sample_rate)
    return dp_event.MixtureOfGaussiansDpEvent(
        standard_deviation=float(noise_multiplier),
        sensitivities=[0.0] + [float(x) for x in sens],
        sampling_probs=[1.0 - q] + [q * float(p) for p in probs])


def tail_probability(delta: float, randomized_sampled_steps: float, randomized_steps: float) -> float:
    """τ such that the cut-off adds at most a = Σ steps·q·τ = TAIL_FRACTION·δ to δ and b ≈ Σ steps·τ <= 1e-4
    to ε (and τ <= 1e-6)."""
    tau = 1e-6
    if randomized_sampled_steps > 0:
        tau = min(tau, TAIL_FRACTION * delta / randomized_sampled_steps)
    if randomized_steps > 0:
        tau = min(tau, 1e-4 / randomized_steps)
    return tau
