"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
clipping"): each clipping group's threshold C_g follows a target quantile gamma of its per-sample gradient norms.

One step, per group g, with the m = expected batch size and the sampled batch S:

    graph      clips with the C_g it was given (an input of the compiled graph, never a constant) and returns
               s_g = sum_{i in S} (1[||g_i||_g <= C_g] - 1/2)          (centred count: sensitivity 1/2)
    optimizer  b_g = 1/2 + (s_g + N(0, sigma_b^2)) / m                  (the noisy fraction within C_g)
               gradient noise N(0, (z_D C)^2), C = sqrt(sum_g C_g^2) of the C_g that clipped this step
               after the step: C_g <- C_g * exp(-eta (b_g - gamma))      (geometric update)

Privacy. Both releases are Gaussian mechanisms on the same Poisson sample. With G groups a sample moves the count
vector by at most sqrt(G)/2 in L2 (each entry by 1/2), so the count release is a Gaussian mechanism of noise
multiplier z_b = 2 sigma_b / sqrt(G); the gradient release has multiplier z_D. Their composition is exactly one
Gaussian mechanism of multiplier z = (z_D^-2 + z_b^-2)^-1/2 (stack the two releases, each scaled to unit noise:
the sensitivity of the stack is sqrt(z_D^-2 + z_b^-2)), and subsampling the pair is subsampling that one
mechanism; dp_accounting's RDP accountant reduces a PoissonSampledDpEvent of a ComposedDpEvent of Gaussians the
same way. So, as in the paper (its Theorem 1, with G = 1), the user chooses z (what the accountant charges, what
make_private calibrates for a target epsilon) and the gradient noise takes z_D = (z^-2 - z_b^-2)^-1/2 > z: the
pair costs what one step of plain DP-SGD at z costs. z must be below z_b (sigma_b large enough); the paper's
default sigma_b = m / 20 gives z_b = m / (10 sqrt(G)).

The accountant is told both multipliers (PrivacyAccountant.step(noise_multiplier=z_D,
quantile_noise_multiplier=z_b)) and records the composition.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import DPCompileError

DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_LEARNING_RATE = 0.2
DEFAULT_INITIAL_MAX_GRAD_NORM = 1.0
#: sigma_b = expected batch size / this (the paper's choice)
QUANTILE_NOISE_DIVISOR = 20.0


def quantile_noise_multiplier(quantile_noise_std: float, groups: int) -> float:
    """z_b of the count release: noise sigma_b per group, L2 sensitivity sqrt(G)/2 of the centred counts."""
    return 2.0 * float(quantile_noise_std) / math.sqrt(groups)


def combined_noise_multiplier(*multipliers: float) -> float:
    """The noise multiplier of the composition of Gaussian mechanisms on the same sample: (sum z_i^-2)^-1/2
    (0 when one of them adds no noise)."""
    if any(z == 0 for z in multipliers):
        return 0.0
    return sum(float(z) ** -2 for z in multipliers) ** -0.5


def gradient_noise_multiplier(noise_multiplier: float, quantile_noise_std: float, groups: int) -> float:
    """z_D with combined(z_D, z_b) = z: the gradient noise that leaves the pair costing one plain step at z."""
    z = float(noise_multiplier)
    if z == 0:
        return 0.0
    zb = quantile_noise_multiplier(quantile_noise_std, groups)
    rest = z ** -2 - zb ** -2
    if not rest > 0:
        raise DPCompileError(
            f"adaptive clipping: noise_multiplier={z:.6g} is not below the quantile release's multiplier "
            f"z_b = 2 sigma_b / sqrt(G) = {zb:.6g} (sigma_b={quantile_noise_std:.6g}, G={groups} clipping groups), so "
            "no gradient noise can make the pair cost one step at noise_multiplier. Give a larger quantile_noise_std "
            "(the default is expected_batch_size / 20: a larger expected batch), fewer clipping groups (clipping="
            "'flat'), or a smaller noise_multiplier")
    z_d = rest ** -0.5
    while combined_noise_multiplier(z_d, zb) < z:  # round up: the pair is charged no less than z
        z_d = math.nextafter(z_d, math.inf)
    return z_d


class AdaptiveClipping:
    """The adaptive thresholds of one DPOptimizer: the run-time thresholds owner of its parameters' graphs
    (clip_provenance.bind_runtime_thresholds), the quantile counts their backward passes deliver, and the update.

    target_quantile: gamma in (0, 1), the fraction of samples meant to be within their threshold.
    learning_rate: eta > 0 of the geometric update.
    initial_max_grad_norm: C_0, the initial total bound: each of the G groups starts at C_0 / sqrt(G).
    quantile_noise_std: sigma_b, the noise of each group's count; None: expected_batch_size / 20.
    """

    def __init__(self, *, expected_batch_size: float, target_quantile: float = DEFAULT_TARGET_QUANTILE,
                 learning_rate: float = DEFAULT_LEARNING_RATE,
                 initial_max_grad_norm: float = DEFAULT_INITIAL_MAX_GRAD_NORM,
                 quantile_noise_std: Optional[float] = None):
        def positive(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"adaptive clipping: {name}={v!r} must be a positive finite number")
            return float(v)

        if isinstance(target_quantile, bool) or not isinstance(target_quantile, (int, float)) \
                or not 0 < target_quantile < 1:
            raise ValueError(f"adaptive clipping: target_quantile={target_quantile!r} must be in (0, 1)")
        self.target_quantile = float(target_quantile)
        self.learning_rate = positive("learning_rate", learning_rate)
        self.initial_max_grad_norm = positive("initial_max_grad_norm", initial_max_grad_norm)
        self.expected_batch_size = positive("expected_batch_size", expected_batch_size)
        self.quantile_noise_std = (self.expected_batch_size / QUANTILE_NOISE_DIVISOR if quantile_noise_std is None
                                   else positive("quantile_noise_std", quantile_noise_std))
        self.values: dict = {}  # group -> C_g (float), known from the first graph call on
        self.version = 0  # one per update: every graph call reads the thresholds of one version
        self._epoch = 0  # one per update or load (never saved): what a delivery is checked against
        self.history: list = []  # (step, {group: C_g}) of every update, for reports
        self._tensors: dict = {}  # (groups, device) -> the (G,) float64 thresholds tensor of `version`
        self._counts: dict = {}  # groups -> summed counts (G,) delivered at `version`
        self._stale = 0  # deliveries of calls that read an older version

    # -- the run-time thresholds owner (clip_provenance) ----------------------------------------------------
    def thresholds(self, groups: tuple, device) -> tuple:
        """((G,) float64 tensor of C_g for `groups`, its version), for one graph call."""
        if not self.values:
            c0 = self.initial_max_grad_norm / math.sqrt(len(groups))
            self.values = {g: c0 for g in groups}
        elif set(groups) != set(self.values):
            raise DPCompileError(
                f"adaptive clipping: a graph clips the groups {sorted(groups)[:6]} but this optimizer's thresholds are "
                f"for {sorted(self.values)[:6]}: every graph of the model must have the same clipping groups (compile "
                "the whole model as one graph with one `clipping`)")
        key = (tuple(groups), str(device))
        t = self._tensors.get(key)
        if t is None:
            t = torch.tensor([self.values[g] for g in groups], dtype=torch.float64, device=device)
            self._tensors[key] = t
        return t, self._epoch

    def deliver(self, groups: tuple, counts: torch.Tensor, epoch: int) -> None:
        """A graph call's backward: its centred counts, for the thresholds it read (`epoch`, from thresholds())."""
        if epoch != self._epoch:
            self._stale += 1
            return
        key = tuple(groups)
        prev = self._counts.get(key)
        counts = counts.to(torch.float64)
        self._counts[key] = counts if prev is None else prev + counts.to(prev.device)

    # -- the optimizer's side ----------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return len(self.values)

    def total(self) -> float:
        """C = sqrt(sum_g C_g^2) of the current thresholds (C_0 before the first graph call)."""
        if not self.values:
            return self.initial_max_grad_norm
        return math.sqrt(sum(c * c for c in self.values.values()))

    def problem(self) -> Optional[str]:
        """Why the gradients in .grad cannot be noised for the current thresholds, or None."""
        if self._stale:
            return (f"{self._stale} backward pass(es) of compiled calls whose forward ran before the last step "
                    "arrived after it: they were clipped to the previous thresholds, which the noise of this step is "
                    "not calibrated for. Run forward and backward of a micro-batch between the same two steps (or "
                    "optimizer.zero_grad() to discard these gradients)")
        return None

    def take_counts(self) -> torch.Tensor:
        """s_g summed over this step's graph calls, in sorted group order (float64, CPU); zeros for groups no
        backward reached (an empty batch still releases a noisy count). Clears them."""
        order = sorted(self.values)
        total = torch.zeros(len(order), dtype=torch.float64)
        for groups, counts in self._counts.items():
            c = counts.detach().cpu()
            for k, g in enumerate(groups):
                total[order.index(g)] += c[k]
        self._counts.clear()
        return total

    def discard_counts(self) -> None:
        """zero_grad: the counts belong to the gradients discarded with them."""
        self._counts.clear()
        self._stale = 0

    def noisy_fractions(self, counts: torch.Tensor, noise: torch.Tensor,
                        expected_batch_size: Optional[float] = None) -> torch.Tensor:
        """b_g = 1/2 + (s_g + noise_g) / m (m: the optimizer's expected batch size of this step)."""
        m = self.expected_batch_size if expected_batch_size is None else float(expected_batch_size)
        return 0.5 + (counts + noise.to(torch.float64)) / m

    def update(self, fractions: torch.Tensor, step: int) -> None:
        """C_g <- C_g exp(-eta (b_g - gamma)), then a new version (the next graph calls read it)."""
        order = sorted(self.values)
        for k, g in enumerate(order):
            self.values[g] = self.values[g] * math.exp(-self.learning_rate * (float(fractions[k]) - self.target_quantile))
        self.version += 1
        self._epoch += 1
        self._tensors.clear()
        self._counts.clear()
        self._stale = 0
        self.history.append((step, dict(self.values)))

    def state_dict(self) -> dict:
        return {"target_quantile": self.target_quantile, "learning_rate": self.learning_rate,
                "initial_max_grad_norm": self.initial_max_grad_norm, "expected_batch_size": self.expected_batch_size,
                "quantile_noise_std": self.quantile_noise_std, "values": dict(self.values), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.target_quantile = float(state["target_quantile"])
        self.learning_rate = float(state["learning_rate"])
        self.initial_max_grad_norm = float(state["initial_max_grad_norm"])
        self.expected_batch_size = float(state["expected_batch_size"])
        self.quantile_noise_std = float(state["quantile_noise_std"])
        self.values = {str(k): float(v) for k, v in state["values"].items()}
        self.version = int(state["version"])
        self._epoch += 1  # a call that read the thresholds before the load is stale after it
        self._tensors.clear()
        # gradients already delivered were clipped to the thresholds before the load: refused until zero_grad
        self._stale = self._stale + len(self._counts)
        self._counts.clear()

    def __repr__(self) -> str:
        return (f"AdaptiveClipping(gamma={self.target_quantile}, eta={self.learning_rate}, "
                f"sigma_b={self.quantile_noise_std:.4g}, C={self.total():.4g})")


#: the keyword arguments of adaptive clipping, as make_private, DPOptimizer and the CLI take them
ADAPTIVE_KEYS = ("target_quantile", "clip_learning_rate", "initial_max_grad_norm", "quantile_noise_std")


def make_adaptive(expected_batch_size: float, options: Optional[dict]) -> AdaptiveClipping:
    """An AdaptiveClipping from {target_quantile, clip_learning_rate, initial_max_grad_norm, quantile_noise_std}."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(ADAPTIVE_KEYS))
    if unknown:
        raise ValueError(f"adaptive clipping: unknown option(s) {unknown}; valid: {list(ADAPTIVE_KEYS)}")
    kw = {k: v for k, v in options.items() if v is not None}
    if "clip_learning_rate" in kw:
        kw["learning_rate"] = kw.pop("clip_learning_rate")
    return AdaptiveClipping(expected_batch_size=expected_batch_size, **kw)
