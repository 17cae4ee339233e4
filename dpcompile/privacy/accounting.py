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
to about 1e-3 relative), stopping at `PLD_MIN_INTERVAL`. Every ε reported by the library is a
pessimistic (upper) estimate at any interval. A fixed interval can be passed instead.

Randomized (probe-estimated) per-sample norms, `probes=k`: the step is a mixture-of-Gaussians event over the
chi-square envelope of the estimate (randomized_accounting.py; PLD only), and the cut-off tail of the envelope
adds 1e-3 δ to δ and at most 1e-4 to ε. `PrivacyAccountant.step(..., probes=k)` records such steps; an
accountant that was not told about randomized norms the kernels ran (they record every run) refuses to report ε.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence

__all__ = ["ACCOUNTANTS", "get_epsilon", "get_noise_multiplier", "PrivacyAccountant", "RandomizedAccountingError"]

ACCOUNTANTS = ("pld", "rdp")

PLD_START_INTERVAL = 1e-2  # first (coarsest) value_discretization_interval of the adaptive PLD
PLD_MIN_INTERVAL = 1e-6    # finest interval the adaptive PLD goes to
PLD_RTOL = 1e-3            # relative agreement of successive ε that stops the refinement
PLD_ATOL = 1e-6            # ... or this absolute agreement (ε so small it does not matter)

History = List[tuple]  # (noise_multiplier σ, sample_rate q, count), or (σ, q, count, RandomizedSpec)


class RandomizedAccountingError(ValueError):
    """ε was asked for steps that ran randomized norms without telling the accountant their probe count."""


# ----------------------------------------------------------------------------------------- checks
def _check_accountant(accountant) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}")
    return accountant


def _check_sigma(noise_multiplier, name: str = "noise_multiplier") -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real):
        raise ValueError(f"{name}={noise_multiplier!r} must be a real number >= 0")
    s = float(noise_multiplier)
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"{name}={noise_multiplier!r} must be a finite number >= 0")
    return s


def _check_rate(sample_rate, name: str = "sample_rate") -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise ValueError(f"{name}={sample_rate!r} must be a real number in [0, 1]")
    q = float(sample_rate)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"{name}={sample_rate!r} must be in [0, 1]")
    return q


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
    from .randomized_accounting import RandomizedSpec

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
        from .randomized_accounting import mog_event, tail_probability

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
        from dp_accounting.rdp import RdpAccountant
        acc = RdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(delta))

    from dp_accounting.pld import PLDAccountant

    def pld_eps(interval: float) -> float:
        acc = PLDAccountant(value_discretization_interval=interval)  # keyword: 1st positional is the relation
        acc.compose(event)
        return float(acc.get_epsilon(delta - tail_a)) + tail_b

    if value_discretization_interval is not None:
        return pld_eps(value_discretization_interval)
    interval = PLD_START_INTERVAL
    eps = pld_eps(interval)
    while interval / 2 >= PLD_MIN_INTERVAL:
        interval /= 2
        prev, eps = eps, pld_eps(interval)
        if math.isinf(eps) or abs(prev - eps) <= max(PLD_RTOL * eps, PLD_ATOL):
            break
    return eps


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
                         group_weights: Optional[Sequence[float]] = None, envelope: str = "chi2") -> float:
    """The smallest σ, rounded up, with get_epsilon(σ, sample_rate, steps, target_delta) <= target_epsilon.

    probes / variant / group_weights / envelope: randomized norms, as in get_epsilon.

    Bisection on log σ over get_epsilon (ε decreases with σ). epsilon_tolerance is relative in σ: the
    result σ satisfies ε(σ) <= target_epsilon (always checked) and σ <= (1 + epsilon_tolerance)·σ_min.
    Returns 0.0 when no step can touch an example (steps == 0 or sample_rate == 0).
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

    memo: Dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in memo:
            memo[sigma] = _history_epsilon([(sigma, q, n, spec)], d, acc, vdi)
        return memo[sigma]

    # Bracket [lo, hi] with ε(lo) > target >= ε(hi), doubling / halving from σ = 1.
    sigma_max, sigma_min = 1e6, 1e-4
    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > sigma_max:
            raise ValueError(f"target_epsilon={target} at target_delta={d} is unreachable with "
                             f"noise_multiplier <= {sigma_max:g} (sample_rate={q}, steps={n})")
    lo = hi / 2.0
    while eps(lo) <= target:
        hi, lo = lo, lo / 2.0
        if lo < sigma_min:
            return hi  # ε(hi) <= target was computed: almost no noise needed (δ large against q·steps)
    # Bisection on log σ until hi / lo <= 1 + tol; hi always keeps ε(hi) <= target.
    while hi / lo > 1.0 + tol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    # The returned σ is one whose ε was computed and is <= target; re-check anyway and move up if not.
    while _history_epsilon([(hi, q, n, spec)], d, acc, vdi) > target:
        hi *= 1.0 + tol
    return hi


# ------------------------------------------------------------------------------------ accountant
class PrivacyAccountant:
    """Records the (σ, q) of every logical step and reports ε of the whole (heterogeneous) history.

    Consecutive steps with equal (σ, q) (and equal randomized-norm description) are merged into one
    (σ, q, count) entry, or (σ, q, count, RandomizedSpec) for steps with randomized norms. ε is cached per δ
    until the next step. state_dict() is a plain JSON-serialisable dict for checkpoints.

    Randomized norms: step(..., probes=k) records a step whose per-sample norms were estimated with k probes.
    The randomized kernels record every run (randomized_accounting.record_randomized_use, via the
    dpcompile::probe_seed op); each step() takes that record, and a step taken without probes= after randomized
    norms ran is counted as unaccounted: get_epsilon then raises RandomizedAccountingError instead of reporting
    a plain Gaussian ε. When the record shows fewer probes than probes= says, the smaller count is used; when
    it shows probe counts that are not all multiples of the accounted one, the Chernoff envelope is used.
    """

    def __init__(self, accountant: str = "pld", *, value_discretization_interval: Optional[float] = None):
        self.accountant = _check_accountant(accountant)
        self.value_discretization_interval = _check_interval(value_discretization_interval)
        self._history: History = []
        self._cache: Dict[float, float] = {}
        self._unaccounted_randomized = 0

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1,
             probes: Optional[int] = None, variant: str = "hutchinson",
             group_weights: Optional[Sequence[float]] = None, envelope: str = "chi2") -> None:
        """Record `num_steps` logical steps with noise multiplier σ and Poisson sampling rate q.

        probes / variant / group_weights / envelope: the step's per-sample norms were randomized (see
        get_epsilon); None = exact norms."""
        s = _check_sigma(noise_multiplier)
        q = _check_rate(sample_rate)
        n = _check_steps(num_steps, "num_steps")
        spec = _randomized_spec(probes, variant, group_weights, envelope)
        if n == 0:
            return
        from .randomized_accounting import take_randomized_use

        ran = take_randomized_use()
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
                from .randomized_accounting import RandomizedSpec

                e = e + (RandomizedSpec.from_json(entry[3]),)
            history.append(e)
        unaccounted = _check_steps(state.get("unaccounted_randomized_steps", 0), "unaccounted_randomized_steps")
        self.accountant, self.value_discretization_interval = accountant, vdi
        self._history = history
        self._unaccounted_randomized = unaccounted
        self._cache.clear()

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.accountant!r}, steps={self.steps}, entries={len(self._history)})"
