"""Privacy accounting for DP-SGD: ε of Poisson-subsampled Gaussian steps, and σ for a target ε.

A thin layer over Google's `dp_accounting` library (PLD and RDP accountants); no accountant is
implemented here. The library is imported lazily inside the functions because it pins attrs<24.

Each logical step is `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` (add/remove-one neighbours);
a run is the `ComposedDpEvent` of `SelfComposedDpEvent(step, count)` over its (σ, q, count) history.

PLD discretization: by default the value_discretization_interval is chosen adaptively. Its error is
absolute in the privacy loss and grows with the number of compositions, so no single interval is
both fast and accurate everywhere (measured with dp-accounting 0.6.0, δ as given):
    q=0.01,  σ=1, 1000 steps, δ=1e-5:  ε = 1.82893 @1e-3, 1.82824 @1e-4, 1.82824 @1e-5
    q=0.001, σ=2, 10^4 steps, δ=1e-6:  ε = 0.26264 @1e-3, 0.20555 @1e-4, 0.20494 @1e-5
We start at 1e-2 and halve the interval until two successive ε agree to `PLD_RTOL` = 1e-3
relative (the error shrinks about quadratically with the interval, so the last ε is then accurate
to about 1e-3 relative), stopping at `PLD_MIN_INTERVAL`. A large ε (RDP's estimate above 100) starts
coarser, at about ε·1e-4 on the same grid (1e-2·2^k), where the same agreement is reached at a fraction
of the cost. Every ε reported by the library is a pessimistic (upper) estimate at any interval. A fixed
interval can be passed instead. Where dp_accounting's ε overflows (ε near 710), it is recomputed from
the same discretized distribution in log space (_stable_epsilon).

Randomized (probe-estimated) per-sample norms, `probes=k`: the step is a mixture-of-Gaussians event over the
chi-square envelope of the estimate (randomized_accounting.py; PLD only), and the cut-off tail of the envelope
adds 1e-3 δ to δ and at most 1e-4 to ε. `PrivacyAccountant.step(..., probes=k)` records such steps; a step
told that randomized norms produced its gradients (`probes_ran=`, which DPOptimizer reads from the gradients' clipping
records) but not how to account them makes the accountant refuse to report ε.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Dict, Iterable, List, Optional, Sequence

from ..randomized_contract import probes_summary
from .randomized_accounting import RandomizedSpec, mog_event, tail_probability

__all__ = ["ACCOUNTANTS", "get_epsilon", "get_noise_multiplier", "PrivacyAccountant", "RandomizedAccountingError"]

ACCOUNTANTS = ("pld", "rdp")

PLD_START_INTERVAL = 1e-2  # first (coarsest) value_discretization_interval of the adaptive PLD
PLD_MIN_INTERVAL = 1e-6    # finest interval the adaptive PLD goes to
PLD_RTOL = 1e-3            # relative agreement of successive ε that stops the refinement
PLD_ATOL = 1e-6            # ... or this absolute agreement (ε so small it does not matter)
PLD_START_RELATIVE = 1e-4  # a large ε starts at an interval of about ε * this (see _pld_start_interval) ...
PLD_MAX_DOUBLINGS = 12     # ... at most PLD_START_INTERVAL * 2^12 = 40.96 (dp_accounting overflows near 709)

History = List[tuple]  # (noise_multiplier σ, sample_rate q, count), or (σ, q, count, RandomizedSpec)


class RandomizedAccountingError(ValueError):
    """ε was asked for steps that ran randomized norms without telling the accountant their probe count."""


# ----------------------------------------------------------------------------------------- checks
def _check_accountant(accountant) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}")
    return accountant


def _real(value, name: str, ok, kind: str, requirement: str) -> float:
    """float(value) when it is a real number (not a bool) meeting ok; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number {kind}")
    v = float(value)
    if not ok(v):
        raise ValueError(f"{name}={value!r} must be {requirement}")
    return v


def _check_sigma(noise_multiplier, name: str = "noise_multiplier") -> float:
    return _real(noise_multiplier, name, lambda s: s >= 0 and math.isfinite(s), ">= 0", "a finite number >= 0")


def _check_rate(sample_rate, name: str = "sample_rate") -> float:
    return _real(sample_rate, name, lambda q: 0.0 <= q <= 1.0, "in [0, 1]", "in [0, 1]")


def _check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or steps != int(steps):
        raise ValueError(f"{name}={steps!r} must be a non-negative integer")
    if steps < 0:
        raise ValueError(f"{name}={steps!r} must be a non-negative integer")
    return int(steps)


def _check_delta(delta, name: str = "delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"{name}={delta!r} must be in (0, 1)")
    return float(delta)


def _randomized_spec(probes, variant, group_weights, envelope):
    """None for deterministic norms, else the RandomizedSpec of randomized ones."""
    if probes is None:
        if group_weights is not None:
            raise ValueError("group_weights describe randomized norms: pass probes= too")
        return None
    return RandomizedSpec.make(probes, variant, group_weights, envelope)


def _check_interval(value_discretization_interval) -> Optional[float]:
    if value_discretization_interval is None:
        return None
    v = float(value_discretization_interval)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"value_discretization_interval={value_discretization_interval!r} must be > 0 (or None)")
    return v


# ------------------------------------------------------------------------------------------- core
def _history_epsilon(history: Sequence[tuple], delta: float, accountant: str,
                     value_discretization_interval: Optional[float]) -> float:
    """ε of the composition of validated (σ, q, count[, RandomizedSpec]) entries."""
    entries = [e for e in history if e[2] > 0 and e[1] > 0]
    if not entries:
        return 0.0
    if any(e[0] == 0 for e in entries):
        return math.inf  # an un-noised step that may touch an example: no DP guarantee
    randomized = [e for e in entries if len(e) > 3 and e[3] is not None]
    if randomized and accountant != "pld":
        raise ValueError("randomized norms are accounted with the PLD accountant only (accountant='pld'): "
                         "their mixture-of-Gaussians event has no RDP bound in dp_accounting")

    import dp_accounting  # lazy: pins attrs<24

    events = []
    tail_a = tail_b = 0.0
    if randomized:
        sampled = sum(e[2] * e[1] for e in randomized)
        tau = tail_probability(delta, sampled, sum(e[2] for e in randomized))
        tail_a = tau * sampled                                     # P(some cut-off event) <= a: added to δ
        tail_b = -sum(e[2] for e in randomized) * math.log1p(-tau)  # (1 - τ)^steps: added to ε
        if tail_a >= delta / 2:
            raise ValueError(f"delta={delta} is too small for the randomized-norm tail budget")
    for e in entries:
        s, q, n = e[:3]
        if len(e) > 3 and e[3] is not None:
            events.append(dp_accounting.SelfComposedDpEvent(mog_event(s, q, e[3], tau), n))
        else:
            events.append(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n))
    event = dp_accounting.ComposedDpEvent(events)

    if accountant == "rdp":
        return _rdp_epsilon(event, delta)

    def pld_eps(interval: float) -> float:
        return _pld_epsilon(event, delta - tail_a, interval) + tail_b

    if value_discretization_interval is not None:
        return pld_eps(value_discretization_interval)
    interval = _pld_start_interval(None if randomized else event, delta)
    eps = pld_eps(interval)
    while interval / 2 >= PLD_MIN_INTERVAL:
        interval /= 2
        prev, eps = eps, pld_eps(interval)
        if math.isinf(eps) and interval < PLD_START_INTERVAL:
            break  # inf at a fine interval: the loss has an infinite part (or δ is below the truncated tails)
        if not math.isinf(eps) and abs(prev - eps) <= max(PLD_RTOL * eps, PLD_ATOL):
            break
    return eps


def _rdp_epsilon(event, delta: float, quiet: bool = False) -> float:
    from dp_accounting.rdp import RdpAccountant

    with _quiet_absl() if quiet else contextlib.nullcontext():
        acc = RdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_absl():
    """RDP used as an internal estimate: its "_compute_log_a_frac failed to converge ... Excluding this order"
    warnings (absl logging; harmless, the order is left out) would reach users who never asked for RDP."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _pld_start_interval(event, delta: float) -> float:
    """The first (coarsest) discretization interval of the adaptive PLD: PLD_START_INTERVAL, or for a large ε a
    coarser one on the same grid (PLD_START_INTERVAL * 2^k), about ε * PLD_START_RELATIVE with ε estimated by RDP
    (an upper bound, fast). The PLD's cost grows with (range of the privacy loss) / interval, and the range grows
    with ε: at ε = 1e4 an interval of 1e-2 took seconds per evaluation, where 1e-3 relative accuracy needs about
    ε * 1e-4. The refinement below stops at the same 1e-3 relative agreement either way."""
    if event is None:
        return PLD_START_INTERVAL
    try:
        rough = _rdp_epsilon(event, delta, quiet=True)
    except Exception:  # noqa: BLE001 (an estimate only: fall back to the default start)
        return PLD_START_INTERVAL
    if not (math.isfinite(rough) and rough * PLD_START_RELATIVE > PLD_START_INTERVAL):
        return PLD_START_INTERVAL
    k = min(math.floor(math.log2(rough * PLD_START_RELATIVE / PLD_START_INTERVAL)), PLD_MAX_DOUBLINGS)
    return PLD_START_INTERVAL * 2.0 ** k


def _pld_epsilon(event, delta: float, interval: float) -> float:
    """ε at `delta` of `event` by dp_accounting's PLD accountant at one discretization interval (pessimistic).

    dp_accounting's get_epsilon fails for some ε around 700 (float overflow beyond e^709): an OverflowError, or inf
    from (mass - δ) / mass_lower overflowing where ε is finite (σ = 0.0914, q = 0.0043, 703 steps gave inf where
    σ = 0.09 gives 739). Its answer is then recomputed from the same discretized distributions in log space
    (_stable_epsilon)."""
    import numpy as np
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=interval)  # keyword: 1st positional is the relation
    try:
        acc.compose(event)
    except OverflowError:  # an interval too coarse for this loss (math.expm1 of it); the caller refines
        return math.inf
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        try:
            eps = float(acc.get_epsilon(delta))
        except OverflowError:
            eps = math.inf
    if math.isfinite(eps):
        return eps
    pld = getattr(acc, "_pld", None)
    pmfs = [getattr(pld, "_pmf_remove", None), getattr(pld, "_pmf_add", None)]
    if any(p is None for p in pmfs):
        return eps
    return max(_stable_epsilon(p, delta) for p in pmfs)


def _stable_epsilon(pmf, delta: float) -> float:
    """The smallest ε >= 0 with δ(ε) = m_inf + Σ_{l_i > ε} p_i (1 - e^(ε - l_i)) <= delta for one of
    dp_accounting's discretized privacy-loss pmfs (losses l_i, masses p_i, infinite-loss mass m_inf): the quantity
    its get_epsilon_for_delta computes, with every exponential taken of a non-positive number."""
    import numpy as np

    inf_mass = float(pmf._infinity_mass)
    if inf_mass > delta:
        return math.inf
    if hasattr(pmf, "_probs"):  # DensePLDPmf
        probs = np.asarray(pmf._probs, dtype=np.float64)
        losses = (pmf._lower_loss + np.arange(probs.size)) * pmf._discretization
    else:  # SparsePLDPmf
        items = sorted(pmf._loss_probs.items())
        losses = np.array([k for k, _ in items], dtype=np.float64) * pmf._discretization
        probs = np.array([v for _, v in items], dtype=np.float64)
    keep = probs > 0
    order = np.argsort(-losses[keep], kind="stable")
    l, p = losses[keep][order], probs[keep][order]  # descending losses
    if l.size == 0:
        return 0.0
    mass = inf_mass + np.cumsum(p)                    # m_inf + Σ_{i <= j} p_i
    log_w = np.logaddexp.accumulate(np.log(p) - l)    # log Σ_{i <= j} p_i e^(-l_i)
    # For ε in [l[j+1], l[j]], δ(ε) = mass[j] - e^(ε + log_w[j]); ε + log_w[j] <= log(mass[j]) <= 0 there.
    lower_ends = np.append(l[1:], -np.inf)
    d_low = mass - np.exp(lower_ends + log_w)          # δ at each segment's lower end (the largest δ on it)
    above = np.flatnonzero(d_low > delta)
    if above.size == 0:
        return 0.0
    j = int(above[0])
    if mass[j] <= delta:
        return max(0.0, float(l[j]))
    return max(0.0, float(np.log(mass[j] - delta) - log_w[j]))


def get_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "pld", *, value_discretization_interval: Optional[float] = None,
                probes: Optional[int] = None, variant: str = "hutchinson",
                group_weights: Optional[Sequence[float]] = None, envelope: str = "chi2") -> float:
    """ε at `delta` of `steps` Poisson-subsampled Gaussian steps (sampling probability q, noise multiplier σ).

    accountant: "pld" (tight, default) or "rdp" (looser, fast). value_discretization_interval: PLD only;
    None = adaptive to about 1e-3 relative accuracy (see the module docstring).
    probes: None for exact per-sample norms; k for randomized norms with k probes per site (variant
    "hutchinson" or "hutchpp"; group_weights: C_g^2 / C^2 of the clipping groups holding randomized sites when
    there is more than one group; envelope "chi2" or "chernoff": see randomized_accounting.py). PLD only.
    Returns 0.0 if steps == 0 or sample_rate == 0, and math.inf if noise_multiplier == 0.
    """
    s = _check_sigma(noise_multiplier)
    q = _check_rate(sample_rate)
    n = _check_steps(steps)
    d = _check_delta(delta)
    acc = _check_accountant(accountant)
    vdi = _check_interval(value_discretization_interval)
    spec = _randomized_spec(probes, variant, group_weights, envelope)
    return _history_epsilon([(s, q, n, spec)], d, acc, vdi)


def get_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                         accountant: str = "pld", epsilon_tolerance: float = 0.01, *,
                         value_discretization_interval: Optional[float] = None,
                         probes: Optional[int] = None, variant: str = "hutchinson",
                         group_weights: Optional[Sequence[float]] = None, envelope: str = "chi2",
                         history: Optional[Sequence[tuple]] = None) -> float:
    """The smallest σ, rounded up, with get_epsilon(σ, sample_rate, steps, target_delta) <= target_epsilon.

    probes / variant / group_weights / envelope: randomized norms, as in get_epsilon.
    history: steps already taken, as `PrivacyAccountant.history` gives them ((σ, q, count[, RandomizedSpec])
    entries): σ is then the smallest whose `steps` further steps keep the composition of the history and them at
    or below target_epsilon (a run that continues an earlier one's privacy spending). ValueError when the history
    alone already spends target_epsilon.

    Search (ε decreases with σ): for PLD, RDP first brackets σ (fast at any σ; its ε is an upper bound, so its σ
    is one too), then secant steps on log σ against log ε with PLD, each checked by evaluating on both sides of
    the estimate (_smallest_sigma): a few PLD evaluations, each starting at a discretization matched to ε
    (_pld_start_interval), so that ε = 1e4 or 1e6 takes under a second (before: 70 s, and over 8 minutes).
    epsilon_tolerance is relative in σ: the result σ satisfies ε(σ) <= target_epsilon (an evaluated σ is
    returned) and σ <= (1 + epsilon_tolerance)·σ_min. Returns 0.0 when no step can touch an example (steps == 0
    or sample_rate == 0).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a positive finite number")
    target = float(target_epsilon)
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target_epsilon={target_epsilon!r} is unreachable: it must be a positive finite number "
                         "(ε = 0 would need infinite noise)")
    d = _check_delta(target_delta, "target_delta")
    q = _check_rate(sample_rate)
    n = _check_steps(steps)
    acc = _check_accountant(accountant)
    vdi = _check_interval(value_discretization_interval)
    tol = float(epsilon_tolerance)
    if not 0 < tol < 1:
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance!r} must be in (0, 1)")
    spec = _randomized_spec(probes, variant, group_weights, envelope)
    if n == 0 or q == 0:
        return 0.0
    if history:
        return _noise_multiplier_after(list(history), target, d, q, n, spec, acc, vdi, tol)

    def exact(sigma: float) -> float:
        return _history_epsilon([(sigma, q, n, spec)], d, acc, vdi)

    def unreachable() -> ValueError:
        return ValueError(f"target_epsilon={target} at target_delta={d} is unreachable with "
                          f"noise_multiplier <= {SIGMA_MAX:g} (sample_rate={q}, steps={n})")

    if acc == "rdp":
        return _smallest_sigma(exact, target, tol, 1.0, unreachable)
    # PLD: bracket with RDP first (fast at any σ, and never below PLD's ε: its σ is an upper bound up to PLD's
    # discretization), then search with PLD from there. Starting the PLD search from σ = 1 instead would evaluate
    # PLD far from the answer, where each evaluation can take seconds (tiny σ: a huge privacy-loss range).
    start = 1.0
    if spec is None:
        rdp = lambda sigma: _history_epsilon([(sigma, q, n, None)], d, "rdp", None)  # noqa: E731
        try:
            with _quiet_absl():
                start = _smallest_sigma(rdp, target, RDP_BRACKET_TOLERANCE, 1.0, unreachable)
        except ValueError:
            start = SIGMA_MAX
    return _smallest_sigma(exact, target, tol, start, unreachable)


def _noise_multiplier_after(history: list, target: float, d: float, q: float, n: int, spec, acc: str,
                            vdi: Optional[float], tol: float) -> float:
    """get_noise_multiplier with a history: the σ of `n` more steps that keeps the composition <= target."""
    spent = _history_epsilon(history, d, acc, vdi)
    if not spent < target:
        raise ValueError(f"target_epsilon={target} at target_delta={d} is already spent by the history "
                         f"(epsilon = {spent:.6g} over {sum(e[2] for e in history)} steps): no further step fits")

    def exact(sigma: float) -> float:
        return _history_epsilon(history + [(sigma, q, n, spec)], d, acc, vdi)

    def unreachable() -> ValueError:
        return ValueError(f"target_epsilon={target} at target_delta={d} is unreachable with "
                          f"noise_multiplier <= {SIGMA_MAX:g} after the history (epsilon = {spent:.6g}; "
                          f"sample_rate={q}, steps={n})")

    # the σ of exact-norm steps for the whole target without the history is a lower bound (the history and
    # randomized norms only add privacy loss)
    start = get_noise_multiplier(target, d, q, n, acc, tol, value_discretization_interval=vdi)
    return _smallest_sigma(exact, target, tol, max(start, SIGMA_MIN), unreachable)


SIGMA_MAX, SIGMA_MIN = 1e6, 1e-4   # the σ search's range (below SIGMA_MIN: "almost no noise needed")
RDP_BRACKET_TOLERANCE = 0.05       # the RDP σ that starts the PLD search needs no more precision


def _smallest_sigma(eps, target: float, tol: float, start: float, unreachable) -> float:
    """The smallest σ, up to a factor (1 + tol), with eps(σ) <= target, for eps decreasing in σ; the σ returned
    is one whose eps was computed and is <= target.

    Searched on x = log σ against g = log(ε / target), which is close to linear (ε ∝ σ^-2 at small σ, ∝ σ^-1 at
    large σ): from `start`, jumps along the local slope (guessed, then measured) until the root is bracketed, then
    secant estimates of the root, each checked by evaluating just above and just below it, so that a bracket of
    width log(1 + tol) usually takes two evaluations. A round that does not halve the bracket is followed by a
    bisection, so the search always ends."""
    memo: Dict[float, float] = {}
    log_target = math.log(target)
    x_max, x_min = math.log(SIGMA_MAX), math.log(SIGMA_MIN)
    width = math.log1p(tol)

    def g(x: float) -> float:
        sigma = math.exp(x)
        if sigma not in memo:
            memo[sigma] = eps(sigma)
        e = memo[sigma]
        return -math.inf if e <= 0 else math.log(e) - log_target  # inf stays inf

    x = math.log(start)
    gx = g(x)
    lo = hi = None  # (x, g) with g > 0 (too little noise) / g <= 0
    if gx > 0:
        lo = (x, gx)
    else:
        hi = (x, gx)
    prev = None
    k = 0
    while lo is None or hi is None:  # bracket: jump along the slope, further each time it falls short
        cur = hi if lo is None else lo
        slope = 2.0 if lo is None else 1.0  # ε ∝ σ^-slope: going down, 2 lands short; going up, 1 lands beyond
        if prev is not None and math.isfinite(prev[1]) and math.isfinite(cur[1]) and prev[0] != cur[0]:
            slope = min(max(-(cur[1] - prev[1]) / (cur[0] - prev[0]), 0.5), 3.0)
        if math.isfinite(cur[1]) and cur[1] != 0:
            step = abs(cur[1]) / slope + width
        else:
            step = math.log(2.0)
        step = max(step, width) * 2.0 ** max(0, k - 1)  # the same step twice, then doubling
        k += 1
        if lo is None:
            if cur[0] <= x_min:
                return math.exp(cur[0])  # ε(hi) <= target was computed: almost no noise needed
            x = max(cur[0] - min(step, 4.0 * 2.0 ** k), x_min)  # not too far down: PLD is slow at tiny σ
        else:
            if cur[0] >= x_max:
                raise unreachable()
            x = min(cur[0] + step, x_max)
        prev = cur
        gx = g(x)
        if gx > 0:
            lo = (x, gx)
        else:
            hi = (x, gx)
    bisect = False
    while hi[0] - lo[0] > width:
        before = hi[0] - lo[0]
        if bisect or not (math.isfinite(lo[1]) and math.isfinite(hi[1])):
            root = (lo[0] + hi[0]) / 2
            probes = [root]
        else:
            root = lo[0] + lo[1] * (hi[0] - lo[0]) / (lo[1] - hi[1])
            probes = [root + 0.45 * width, root - 0.45 * width]
        for x in probes:
            if not lo[0] < x < hi[0] or hi[0] - lo[0] <= width:
                continue
            gx = g(x)
            if gx > 0:
                lo = (x, gx)
            else:
                hi = (x, gx)
        bisect = hi[0] - lo[0] > before / 2
    return math.exp(hi[0])


# ------------------------------------------------------------------------------------ accountant
class PrivacyAccountant:
    """Records the (σ, q) of every logical step and reports ε of the whole (heterogeneous) history.

    Consecutive steps with equal (σ, q) (and equal randomized-norm description) are merged into one
    (σ, q, count) entry, or (σ, q, count, RandomizedSpec) for steps with randomized norms. ε is cached per δ
    until the next step. state_dict() is a plain JSON-serialisable dict for checkpoints.

    Randomized norms: step(..., probes=k) records a step whose per-sample norms were estimated with k probes.
    step(..., probes_ran=counts) tells it which effective probe counts the randomized norms behind the step's
    gradients ran with: a fact the gradients carry (clip_provenance.randomized_runs), which DPOptimizer reads and
    passes on, and which whoever steps an accountant by hand passes the same way. A step told probes_ran but not
    probes= is counted as unaccounted: get_epsilon then raises RandomizedAccountingError instead of reporting a
    plain Gaussian ε. When probes_ran holds fewer probes than probes= says, the smaller count is used; when it
    holds counts that are not all multiples of the accounted one, the Chernoff envelope is used.
    """

    def __init__(self, accountant: str = "pld", *, value_discretization_interval: Optional[float] = None):
        self.accountant = _check_accountant(accountant)
        self.value_discretization_interval = _check_interval(value_discretization_interval)
        self._history: History = []
        self._cache: Dict[float, float] = {}
        self._unaccounted_randomized = 0

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1,
             probes: Optional[int] = None, variant: str = "hutchinson",
             group_weights: Optional[Sequence[float]] = None, envelope: str = "chi2",
             quantile_noise_multiplier: Optional[float] = None, probes_ran: Optional[Iterable[int]] = None) -> None:
        """Record `num_steps` logical steps with noise multiplier σ and Poisson sampling rate q.

        probes / variant / group_weights / envelope: the step's per-sample norms were randomized (see
        get_epsilon); None = exact norms.
        probes_ran: the effective probe counts (randomized_contract.accounting_probes) of the randomized norms that
        produced the step's gradients (see the class docstring); None or empty: none ran.
        quantile_noise_multiplier: adaptive clipping (privacy/adaptive.py): the same Poisson sample also released
        the noisy quantile counts, a Gaussian mechanism of this multiplier z_b. The step is recorded as the
        composition of the two Gaussian mechanisms, which is exactly one Gaussian mechanism of multiplier
        (σ^-2 + z_b^-2)^-1/2 (what dp_accounting's RDP accountant makes of a PoissonSampledDpEvent of their
        ComposedDpEvent, and what its PLD accountant gives for their composition without sampling)."""
        s = _check_sigma(noise_multiplier)
        if quantile_noise_multiplier is not None:
            if probes is not None:
                raise ValueError("adaptive clipping with randomized norms is not accounted")
            from .adaptive import combined_noise_multiplier

            zb = _check_sigma(quantile_noise_multiplier, "quantile_noise_multiplier")
            s = combined_noise_multiplier(s, zb)
        q = _check_rate(sample_rate)
        n = _check_steps(num_steps, "num_steps")
        spec = _randomized_spec(probes, variant, group_weights, envelope)
        ran = probes_summary(probes_ran or ())
        if n == 0:
            return
        self._cache.clear()
        if ran is not None and spec is None:
            self._unaccounted_randomized += n
            return
        if ran is not None:
            import dataclasses

            k, multiples = ran
            spec = dataclasses.replace(spec, probes=min(k, spec.probes))
            if not multiples or spec.probes != k and k % spec.probes:
                spec = dataclasses.replace(spec, envelope="chernoff")
        key = (s, q) if spec is None else (s, q, spec)
        last = self._history[-1] if self._history else None
        if last is not None and (last[:2] if len(last) == 3 else (last[0], last[1], last[3])) == key:
            self._history[-1] = last[:2] + (last[2] + n,) + last[3:]
        else:
            self._history.append((s, q, n) if spec is None else (s, q, n, spec))

    @property
    def history(self) -> History:
        """(σ, q, count) entries, or (σ, q, count, RandomizedSpec) for randomized norms, oldest first (a copy)."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of logical steps recorded (accounted or not)."""
        return sum(e[2] for e in self._history) + self._unaccounted_randomized

    @property
    def unaccounted_randomized_steps(self) -> int:
        """Steps that ran randomized norms but were recorded without probes= (ε is refused while > 0)."""
        return self._unaccounted_randomized

    def get_epsilon(self, delta: float) -> float:
        """ε at `delta` of all steps so far (0.0 before any step; inf if a step had σ = 0 and q > 0)."""
        d = _check_delta(delta)
        if self._unaccounted_randomized:
            raise RandomizedAccountingError(
                f"{self._unaccounted_randomized} logical step(s) ran randomized (probe-estimated) per-sample norms "
                "but were recorded without probes=: the plain Gaussian ε does not hold for them. Record such "
                "steps with PrivacyAccountant.step(..., probes=k, variant=..., group_weights=...)")
        if d not in self._cache:
            self._cache[d] = _history_epsilon(self._history, d, self.accountant, self.value_discretization_interval)
        return self._cache[d]

    def state_dict(self) -> dict:
        return {"accountant": self.accountant,
                "value_discretization_interval": self.value_discretization_interval,
                "history": [list(e[:3]) + ([e[3].to_json()] if len(e) > 3 else []) for e in self._history],
                "unaccounted_randomized_steps": self._unaccounted_randomized}

    def load_state_dict(self, state: dict) -> None:
        accountant = _check_accountant(state.get("accountant", self.accountant))
        vdi = _check_interval(state.get("value_discretization_interval", self.value_discretization_interval))
        history: History = []
        for entry in state["history"]:
            s, q, n = entry[:3]
            e = (_check_sigma(s), _check_rate(q), _check_steps(n, "count"))
            if len(entry) > 3:
                e = e + (RandomizedSpec.from_json(entry[3]),)
            history.append(e)
        unaccounted = _check_steps(state.get("unaccounted_randomized_steps", 0), "unaccounted_randomized_steps")
        self.accountant, self.value_discretization_interval = accountant, vdi
        self._history = history
        self._unaccounted_randomized = unaccounted
        self._cache.clear()

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.accountant!r}, steps={self.steps}, entries={len(self._history)})"
