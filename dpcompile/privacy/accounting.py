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
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["ACCOUNTANTS", "get_epsilon", "get_noise_multiplier", "PrivacyAccountant"]

ACCOUNTANTS = ("pld", "rdp")

PLD_START_INTERVAL = 1e-2  # first (coarsest) value_discretization_interval of the adaptive PLD
PLD_MIN_INTERVAL = 1e-6    # finest interval the adaptive PLD goes to
PLD_RTOL = 1e-3            # relative agreement of successive ε that stops the refinement
PLD_ATOL = 1e-6            # ... or this absolute agreement (ε so small it does not matter)

History = List[Tuple[float, float, int]]  # (noise_multiplier σ, sample_rate q, count)


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


def _check_interval(value_discretization_interval) -> Optional[float]:
    if value_discretization_interval is None:
        return None
    v = float(value_discretization_interval)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"value_discretization_interval={value_discretization_interval!r} must be > 0 (or None)")
    return v


# ------------------------------------------------------------------------------------------- core
def _history_epsilon(history: Sequence[Tuple[float, float, int]], delta: float, accountant: str,
                     value_discretization_interval: Optional[float]) -> float:
    """ε of the composition of validated (σ, q, count) entries."""
    entries = [(s, q, n) for s, q, n in history if n > 0 and q > 0]
    if not entries:
        return 0.0
    if any(s == 0 for s, _, _ in entries):
        return math.inf  # an un-noised step that may touch an example: no DP guarantee

    import dp_accounting  # lazy: pins attrs<24

    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in entries])

    if accountant == "rdp":
        from dp_accounting.rdp import RdpAccountant
        acc = RdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(delta))

    from dp_accounting.pld import PLDAccountant

    def pld_eps(interval: float) -> float:
        acc = PLDAccountant(value_discretization_interval=interval)  # keyword: 1st positional is the relation
        acc.compose(event)
        return float(acc.get_epsilon(delta))

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
                accountant: str = "pld", *, value_discretization_interval: Optional[float] = None) -> float:
    """ε at `delta` of `steps` Poisson-subsampled Gaussian steps (sampling probability q, noise multiplier σ).

    accountant: "pld" (tight, default) or "rdp" (looser, fast). value_discretization_interval: PLD only;
    None = adaptive to about 1e-3 relative accuracy (see the module docstring).
    Returns 0.0 if steps == 0 or sample_rate == 0, and math.inf if noise_multiplier == 0.
    """
    s = _check_sigma(noise_multiplier)
    q = _check_rate(sample_rate)
    n = _check_steps(steps)
    d = _check_delta(delta)
    acc = _check_accountant(accountant)
    vdi = _check_interval(value_discretization_interval)
    return _history_epsilon([(s, q, n)], d, acc, vdi)


def get_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                         accountant: str = "pld", epsilon_tolerance: float = 0.01, *,
                         value_discretization_interval: Optional[float] = None) -> float:
    """The smallest σ, rounded up, with get_epsilon(σ, sample_rate, steps, target_delta) <= target_epsilon.

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
    if n == 0 or q == 0:
        return 0.0

    memo: Dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in memo:
            memo[sigma] = _history_epsilon([(sigma, q, n)], d, acc, vdi)
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
    while get_epsilon(hi, q, n, d, acc, value_discretization_interval=vdi) > target:
        hi *= 1.0 + tol
    return hi


# ------------------------------------------------------------------------------------ accountant
class PrivacyAccountant:
    """Records the (σ, q) of every logical step and reports ε of the whole (heterogeneous) history.

    Consecutive steps with equal (σ, q) are merged into one (σ, q, count) entry. ε is cached per δ
    until the next step. state_dict() is a plain JSON-serialisable dict for checkpoints.
    """

    def __init__(self, accountant: str = "pld", *, value_discretization_interval: Optional[float] = None):
        self.accountant = _check_accountant(accountant)
        self.value_discretization_interval = _check_interval(value_discretization_interval)
        self._history: History = []
        self._cache: Dict[float, float] = {}

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` logical steps with noise multiplier σ and Poisson sampling rate q."""
        s = _check_sigma(noise_multiplier)
        q = _check_rate(sample_rate)
        n = _check_steps(num_steps, "num_steps")
        if n == 0:
            return
        if self._history and self._history[-1][:2] == (s, q):
            self._history[-1] = (s, q, self._history[-1][2] + n)
        else:
            self._history.append((s, q, n))
        self._cache.clear()

    @property
    def history(self) -> History:
        """(σ, q, count) entries, oldest first (a copy)."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of logical steps recorded."""
        return sum(n for _, _, n in self._history)

    def get_epsilon(self, delta: float) -> float:
        """ε at `delta` of all steps so far (0.0 before any step; inf if a step had σ = 0 and q > 0)."""
        d = _check_delta(delta)
        if d not in self._cache:
            self._cache[d] = _history_epsilon(self._history, d, self.accountant, self.value_discretization_interval)
        return self._cache[d]

    def state_dict(self) -> dict:
        return {"accountant": self.accountant,
                "value_discretization_interval": self.value_discretization_interval,
                "history": [[s, q, n] for s, q, n in self._history]}

    def load_state_dict(self, state: dict) -> None:
        accountant = _check_accountant(state.get("accountant", self.accountant))
        vdi = _check_interval(state.get("value_discretization_interval", self.value_discretization_interval))
        history: History = []
        for entry in state["history"]:
            s, q, n = entry
            history.append((_check_sigma(s), _check_rate(q), _check_steps(n, "count")))
        self.accountant, self.value_discretization_interval = accountant, vdi
        self._history = history
        self._cache.clear()

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.accountant!r}, steps={self.steps}, entries={len(self._history)})"
