"""DPOptimizer: the noise half of DP-SGD, around any torch optimizer.

The flashdp graph leaves in every trainable parameter's .grad the sum of per-sample clipped gradients of the batch
it saw (summed again over micro-batches by autograd's accumulation). One logical step of this optimizer:

    g  <-  (clipped sum + N(0, sigma^2 C_total^2 I)) / expected_batch_size      (the division only for "mean")
    inner optimizer step; accountant.step(sigma, q); the noisy gradients are consumed (.grad = None)

Noise is drawn once per logical step, in fp32 whatever the parameter dtype, also for parameters whose .grad is None
(an empty Poisson batch still costs privacy and must still be noised).

What the compiled graphs vouched for (coverage, sensitivity, randomized norms) is checked by coverage.py (its names
stay importable from here), the noise is drawn by noise.py, and the guards of logical batches and the target epsilon
are step_guards.py.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
from torch.optim import Optimizer

from ..clip_provenance import grad_status_of, provenance, randomized_runs, record_clipped
from ..errors import CoverageError, DPCompileError
from .adaptive import (AdaptiveClipping, combined_noise_multiplier, gradient_noise_multiplier, make_adaptive,
                       quantile_noise_multiplier)
from .coverage import (SENSITIVITY_RTOL, _disjoint, _graphs_by_set, _same_spec, _uncovered_message,  # noqa: F401
                       clipped_sensitivity, is_privatized, randomized_accounting, sensitivity_problem)
from .noise import GaussianNoise
from .randomized_accounting import RandomizedSpec
from .step_guards import StepGuards


def _takes_probes_ran(accountant) -> bool:
    """Whether `accountant.step` can be told the probe counts that ran (probes_ran=): PrivacyAccountant's can; an
    accountant of one's own if its step names the argument."""
    from .accounting import PrivacyAccountant

    if isinstance(accountant, PrivacyAccountant):
        return True
    import inspect

    try:
        return "probes_ran" in inspect.signature(accountant.step).parameters
    except (TypeError, ValueError):
        return False


def total_max_grad_norm(max_grad_norm: Union[float, Mapping[str, float]]) -> float:
    """C_total: C itself, or sqrt(sum C_g^2) for per-group thresholds."""
    if isinstance(max_grad_norm, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm.values()))
    return float(max_grad_norm)


def _refuse_unsynchronized(optimizer: Optimizer, independent_ranks: bool) -> None:
    """A plain DPOptimizer noises and steps one process's gradients: refuse where that is not what was meant."""
    import torch.distributed as dist

    if not dist.is_available():
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (builds without DTensor)
        DTensor = ()
    if any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
        raise DPCompileError(
            "DPOptimizer: the optimizer holds DTensor (sharded, e.g. FSDP2 fully_shard) parameters; DPOptimizer "
            "would noise every rank's shard as if it were the whole parameter. Use "
            "dpcompile.DistributedDPOptimizer(optimizer, module=model, ...) or dpcompile.make_private")
    if dist.is_initialized() and dist.get_world_size() > 1 and not independent_ranks:
        raise DPCompileError(
            f"DPOptimizer: torch.distributed is initialized with {dist.get_world_size()} ranks, but DPOptimizer "
            "noises and steps this rank's clipped sum alone (no all-reduce; the ranks' models would drift apart). "
            "Use dpcompile.DistributedDPOptimizer, which sums the clipped sums of all ranks and adds the noise "
            "once (dpcompile.make_private picks it by itself), or pass independent_ranks=True if every rank is a "
            "separate DP training run on its own data")


def _adaptive_of(max_grad_norm, adaptive_clipping, expected_batch_size: float, who: str):
    """The AdaptiveClipping of max_grad_norm="adaptive" (adaptive_clipping: its options dict, or one built), or None."""
    if isinstance(max_grad_norm, str):
        if max_grad_norm != "adaptive":
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: a positive number, a dict of per-group thresholds, "
                             "or 'adaptive'")
        if isinstance(adaptive_clipping, AdaptiveClipping):
            return adaptive_clipping
        return make_adaptive(expected_batch_size, adaptive_clipping)
    if adaptive_clipping is not None:
        raise ValueError(f"{who}: adaptive_clipping= is given but max_grad_norm={max_grad_norm!r} is fixed; pass "
                         "max_grad_norm='adaptive'")
    return None


class DPOptimizer(StepGuards, GaussianNoise, Optimizer):
    """Wraps `optimizer`; see the module docstring.

    noise_multiplier: sigma. max_grad_norm: C, or the dict of per-group thresholds given to the backend.
    expected_batch_size: q * N, the *expected* logical batch size (never the realised Poisson size).
    loss_reduction: "mean" divides by expected_batch_size, "sum" does not.
    generator: torch.Generator for reproducible noise (on the parameters' device, or CPU).
    secure_mode: every step draws from a fresh generator seeded from os.urandom, and each noise element is the
        mean of four normal draws (scaled back to unit variance), which removes the exact low bits of a single
        float sample that floating-point attacks on the Gaussian mechanism read. It does NOT make torch's
        generator a cryptographic one, does not protect against timing side channels, and does not secure the
        sampling: use PoissonDataLoader(secure_mode=True) for that.
    accountant / sample_rate: when given, accountant.step(noise_multiplier=sigma, sample_rate=q) on every step.
    check_coverage: refuse to step when a parameter has a gradient that no flashdp graph produced.
    check_sensitivity: refuse to step when the thresholds of the graphs that clipped the gradients bound one
        sample's clipped gradient by more than max_grad_norm (a model compiled with C = 2 but noised for C = 1
        would be under-noised), or when those thresholds are unknown.
    Randomized norms (strategy "randomized", docs/randomized.md): when the graphs that clipped the parameters hold
    randomized sites, every accountant step is told their probes, variant and group weights
    (`randomized_norms`), and the probe counts the stepped gradients' clipping records carry (`probes_ran=`,
    clip_provenance.randomized_runs); an accountant that cannot account for them is refused before any noise is
    added.
    max_grad_norm="adaptive" (adaptive clipping, privacy/adaptive.py, docs/privacy.md): the model must be compiled
        with max_grad_norm="adaptive"; its graphs read each group's threshold from this optimizer at every call.
        adaptive_clipping: {target_quantile, clip_learning_rate, initial_max_grad_norm, quantile_noise_std} (or an
        AdaptiveClipping). noise_multiplier is what each step is charged: the gradient noise is z_D (> sigma) so that
        it and the noisy quantile counts drawn every step together cost sigma; the thresholds are updated after
        each step (`optimizer.adaptive.values`).
    independent_ranks: under an initialized torch.distributed group of several ranks this class refuses to be
        built, because it would noise and step each rank's gradient alone (the ranks' models drift apart); use
        dpcompile.DistributedDPOptimizer (make_private picks it). True: each rank is a separate DP run on purpose.
    """

    #: DistributedDPOptimizer sets this: it sums the ranks' clipped sums before noising
    _sums_across_ranks = False

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, max_grad_norm, expected_batch_size: float,
                 loss_reduction: str = "mean", generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, accountant=None, sample_rate: Optional[float] = None,
                 check_coverage: bool = True, independent_ranks: bool = False, check_sensitivity: bool = True,
                 adaptive_clipping=None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DPOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self._sums_across_ranks:
            _refuse_unsynchronized(optimizer, independent_ranks)
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size={expected_batch_size!r} must be positive")
        self.adaptive = _adaptive_of(max_grad_norm, adaptive_clipping, expected_batch_size, type(self).__name__)
        if self.adaptive is not None and self._sums_across_ranks:
            raise DPCompileError(f"{type(self).__name__}: max_grad_norm='adaptive' is not supported across ranks yet "
                                 "(the quantile counts would have to be summed over ranks before the noise)")
        c_total = self.adaptive.total() if self.adaptive is not None else total_max_grad_norm(max_grad_norm)
        if not (c_total > 0 and math.isfinite(c_total)):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be positive")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size={expected_batch_size!r} must be positive")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: choose 'mean' or 'sum'")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode draws its own OS-seeded generator every step: do not pass generator")
        if accountant is not None and sample_rate is None:
            raise ValueError("an accountant needs the sample_rate of the Poisson sampling")
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = float(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.check_coverage = check_coverage
        self.check_sensitivity = check_sensitivity
        self.steps_taken = 0
        self._pending_accounting: dict = {}
        #: the effective probe counts of the randomized norms behind the gradients being noised (add_noise reads
        #: them from the gradients' clipping records, step tells the accountant)
        self._pending_runs: frozenset = frozenset()
        # make_private sets this when it calibrated sigma to a target epsilon for randomized norms (see
        # _recalibrate): the randomized description sigma was computed for, and the target
        self._calibration: Optional[dict] = None
        # share the inner optimizer's state, so LR schedulers and checkpoints see one optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {})
        self._optimizer_step_post_hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
        self._init_guards()
        if self.adaptive is not None:  # its graphs read their thresholds from here (clip_provenance)
            from ..clip_provenance import bind_runtime_thresholds

            bind_runtime_thresholds(list(self._params()), self.adaptive)
        self._pending_quantile = None  # (z_D, z_b, noisy fractions) of the step being taken

    # -- the wrapped optimizer's state ---------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients; inside a logical batch whose earlier physical batches' step() was skipped
        (BatchMemoryManager), a no-op that keeps their clipped sums (see note_physical_batch)."""
        if self._keep_gradients_on_zero_grad():
            return
        if self.adaptive is not None:  # the quantile counts belong to the gradients discarded here
            self.adaptive.discard_counts()
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def max_grad_norm_total(self) -> float:
        """C_total (adaptive clipping: sqrt(sum_g C_g^2) of the thresholds the graphs read now)."""
        if self.adaptive is not None:
            return self.adaptive.total()
        return total_max_grad_norm(self.max_grad_norm)

    def _name_of(self, p: torch.Tensor) -> Optional[str]:
        """The name a compiled graph gave `p`, for messages."""
        prov = provenance(p)
        return prov.name if prov is not None else None

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p

    # the noise draw (_noise, _step_generator, _noise_params): GaussianNoise, noise.py

    # -- checks ----------------------------------------------------------------------------------------------
    def _accounted_params(self) -> list:
        """The privatized tensors whose graphs describe this optimizer's clipping (DistributedDPOptimizer: the
        unsharded parameters for FSDP2 shards)."""
        return [p for p in self._params() if is_privatized(p)]

    def _records(self) -> tuple:
        """(the trainable parameters, their clipping records): one record lookup per parameter for a step's
        checks, which read them three times (coverage, sensitivity, accounting; NOTES 34)."""
        params = list(self._params())
        return params, [provenance(p) for p in params]

    def _check_clipping(self, params: list, provs: list) -> None:
        """Coverage and sensitivity, before any gradient is touched (params, provs: _records())."""
        clipped, clipped_provs = [], []
        for p, prov in zip(params, provs):
            if p.grad is None:
                continue
            why, privatized = grad_status_of(p, prov)
            if self.check_coverage and why is not None:
                raise CoverageError(_uncovered_message(p, why, self._name_of(p)))
            if privatized:
                clipped.append(p)
                clipped_provs.append(prov)
        if self.adaptive is not None:
            self._check_adaptive(clipped)
        elif self.check_sensitivity and clipped:
            problem = sensitivity_problem(clipped, self.max_grad_norm_total, type(self).__name__, clipped_provs)
            if problem is not None:
                raise problem

    def _check_adaptive(self, clipped: list) -> None:
        """Adaptive clipping: every gradient comes from graphs that read their thresholds from this optimizer, at
        the thresholds it holds now (those the noise is scaled to). Not switched off by check_sensitivity."""
        from ..clip_provenance import runtime_thresholds_of

        who = type(self).__name__
        for p in clipped:
            prov = provenance(p)
            fixed = [g for g in prov.graphs if not g.runtime_groups]
            if fixed:
                raise DPCompileError(
                    f"{who}: max_grad_norm='adaptive', but parameter `{prov.name}` was clipped by a graph compiled with "
                    f"fixed thresholds (sensitivity {fixed[0].sensitivity:.6g}); compile the model with "
                    "max_grad_norm='adaptive' (dpcompile.make_private does)")
            if runtime_thresholds_of(p) is not self.adaptive:
                raise DPCompileError(f"{who}: parameter `{prov.name}` reads its thresholds from another optimizer")
        why = self.adaptive.problem()
        if why is not None:
            raise DPCompileError(f"{who}: {why}")
        if not self.adaptive.values:
            raise DPCompileError(
                f"{who}: step() before any call of the compiled model: adaptive clipping's groups (and so its "
                "quantile release) are not known yet. Run the model on the logical batch (an empty one too) first")

    def _step_runs(self) -> frozenset:
        """The effective probe counts of the randomized norms behind the gradients this step noises (read from
        their clipping records, clip_provenance.randomized_runs; empty for exact norms)."""
        return randomized_runs(self._params())

    def _accounting(self, params: list, provs: list) -> dict:
        """The randomized-norm arguments of this step's accountant.step ({} for exact norms), checked before any
        noise is added: an accountant that cannot take them, or gradients from randomized norms that no graph of
        this optimizer's parameters describes, are refused. Sets the probe counts step() tells the accountant.
        params, provs: _records()."""
        accounted = [(p, prov) for p, prov in zip(params, provs) if record_clipped(prov)]
        spec = randomized_accounting([p for p, _ in accounted], self.max_grad_norm_total,
                                     [prov for _, prov in accounted])
        runs = randomized_runs(params, provs)
        self._pending_runs = runs
        return self._check_accounting(spec, ran=bool(runs))

    def _check_accounting(self, spec: Optional[dict], ran: bool) -> dict:
        who = type(self).__name__
        if spec is None:
            if ran and self.accountant is not None:
                raise DPCompileError(
                    f"{who}: the gradients were clipped with randomized (probe-estimated) per-sample norms, but no "
                    "graph that clipped this optimizer's parameters has randomized sites, so the step cannot be "
                    "accounted for them (the accountant would refuse to report epsilon). Step the optimizer of the "
                    "model that was compiled with strategy='randomized'")
            return {}
        try:
            RandomizedSpec.make(spec["probes"], spec["variant"], spec["group_weights"])
        except ValueError as e:
            raise DPCompileError(f"{who}: the randomized norms of the compiled graphs cannot be accounted: {e}") from None
        acc = self.accountant
        if acc is not None:
            from .accounting import PrivacyAccountant

            if isinstance(acc, PrivacyAccountant):
                if acc.accountant != "pld":
                    raise DPCompileError(
                        f"{who}: the model was compiled with randomized norms (strategy 'randomized'), whose "
                        f"privacy is accounted with PLD only; this accountant is {acc.accountant!r}: use "
                        "PrivacyAccountant('pld')")
            else:
                import inspect

                try:
                    params = inspect.signature(acc.step).parameters
                except (TypeError, ValueError):
                    params = {}
                if "probes" not in params and not any(v.kind is inspect.Parameter.VAR_KEYWORD
                                                      for v in params.values()):
                    raise DPCompileError(
                        f"{who}: the model was compiled with randomized norms (strategy 'randomized'), but the "
                        f"accountant {type(acc).__name__}.step takes no probes= argument, so it would account a "
                        "plain Gaussian step; use dpcompile.PrivacyAccountant('pld')")
        self._recalibrate(spec)
        return spec

    def _recalibrate(self, spec: dict) -> None:
        """make_private calibrated sigma before the graphs existed, from a prediction of their randomized groups.
        Before the first step the graphs' own description replaces the prediction (sigma is searched again if they
        differ); later changes (a graph compiled mid-training with other randomized groups) are accounted as they
        are, with a warning that the target epsilon may be exceeded."""
        cal = self._calibration
        if cal is None or _same_spec(cal["spec"], spec):
            return
        if self.steps_taken == 0:
            import warnings

            from .accounting import get_noise_multiplier

            sigma = get_noise_multiplier(cal["target_epsilon"], cal["target_delta"], self.sample_rate, cal["steps"],
                                         accountant=cal["accountant"], **spec)
            warnings.warn(f"{type(self).__name__}: the compiled graphs randomize other clipping groups than "
                          f"make_private predicted ({cal['spec']} -> {spec}); noise_multiplier recalibrated from "
                          f"{self.noise_multiplier:.6g} to {sigma:.6g} for target_epsilon={cal['target_epsilon']}",
                          stacklevel=4)
            self.noise_multiplier = float(sigma)
        else:
            import warnings

            warnings.warn(f"{type(self).__name__}: the compiled graphs' randomized norms changed after training "
                          f"started ({cal['spec']} -> {spec}); the accountant counts them as they are, and the "
                          "epsilon spent may exceed the target", stacklevel=4)
        cal["spec"] = dict(spec)

    @property
    def randomized_norms(self) -> Optional[dict]:
        """{"probes", "variant", "group_weights"} of the randomized norms in the graphs that clipped this
        optimizer's parameters (what an accountant's step(..., **this) needs), or None for exact norms."""
        return randomized_accounting(self._accounted_params(), self.max_grad_norm_total)

    # -- noise -----------------------------------------------------------------------------------------------
    def add_noise(self) -> None:
        """Replace each gradient (a clipped sum) by its noised, scaled version (called by step; exposed for custom
        loops). Refuses, before touching
        any gradient, to noise a gradient no flashdp graph clipped, one clipped to more than max_grad_norm, or
        randomized norms it cannot account for (step() then tells the accountant `self._pending_accounting`)."""
        params, provs = self._records()
        self._check_clipping(params, provs)
        self._pending_accounting = self._accounting(params, provs)
        self._noised_sigma = self.noise_multiplier  # what the accountant records for this step (see step)
        std = self.noise_multiplier * self.max_grad_norm_total
        if self.adaptive is not None:  # the gradient's share of the noise: z_D, with the counts' z_b (adaptive.py)
            std = self._release_quantiles() * self.max_grad_norm_total
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        by_device: dict = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, params in by_device.items():
            gen = self._step_generator(device) if self.secure_mode else self.generator
            self._noise_params(params, device, std, scale, gen)

    def _release_quantiles(self) -> float:
        """Adaptive clipping, in add_noise: the noisy fraction of samples within each group's threshold (drawn
        every step, an empty batch too) for the update after the step; returns z_D, the gradient noise multiplier
        (noise_multiplier is the multiplier of the pair, what the accountant charges)."""
        ad = self.adaptive
        z_d = gradient_noise_multiplier(self.noise_multiplier, ad.quantile_noise_std, ad.groups)
        z_b = quantile_noise_multiplier(ad.quantile_noise_std, ad.groups)
        device = next(iter(self._params())).device
        gen = self._step_generator(device) if self.secure_mode else self.generator
        noise = self._noise((ad.groups,), gen.device if gen is not None else device, ad.quantile_noise_std, gen)
        self._pending_quantile = (z_d, z_b, ad.noisy_fractions(ad.take_counts(), noise.cpu(), self.expected_batch_size))
        return z_d

    def step(self, closure=None):
        """One logical step: noise once, scale, inner step, account, consume the gradients.

        Told by a loader where logical batches end (note_physical_batch), a step() on a physical batch that is
        not the last of its logical batch returns None without stepping; misuse is refused before anything is
        touched (guards.py: two logical batches in .grad, a step past the target epsilon, ...)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._skip_or_refuse_step():
            return None
        self._check_step_settings()
        self._noised_sigma = None
        self.add_noise()
        # the sigma the noise was drawn with (add_noise may recalibrate it), whatever hooks do afterwards
        sigma = self.noise_multiplier if self._noised_sigma is None else self._noised_sigma
        out = self.original_optimizer.step()
        quantile, self._pending_quantile = self._pending_quantile, None
        if self.accountant is not None:
            if quantile is not None:  # the gradient release at z_D and the counts' at z_b, composed
                self._account_adaptive(quantile[0], quantile[1])
            else:
                told = {"probes_ran": sorted(self._pending_runs)} if (
                    self._pending_runs and _takes_probes_ran(self.accountant)) else {}
                self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate,
                                     **self._pending_accounting, **told)
        self._pending_accounting, self._pending_runs = {}, frozenset()
        if quantile is not None:  # the next graph calls clip to the updated thresholds
            self.adaptive.update(quantile[2], self.steps_taken + 1)
        self._after_step()
        self.steps_taken += 1
        # the noisy gradients belong to this step: never let them leak into the next one's sum
        self.original_optimizer.zero_grad(set_to_none=True)
        return out

    def _account_adaptive(self, z_d: float, z_b: float) -> None:
        from .accounting import PrivacyAccountant

        if isinstance(self.accountant, PrivacyAccountant):
            self.accountant.step(noise_multiplier=z_d, sample_rate=self.sample_rate, quantile_noise_multiplier=z_b,
                                 probes_ran=sorted(self._pending_runs))
        else:  # an accountant of its own: one Gaussian step at the pair's multiplier
            self.accountant.step(noise_multiplier=combined_noise_multiplier(z_d, z_b), sample_rate=self.sample_rate)

    # -- privacy spent and checkpoints -------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        if self.accountant is None:
            raise ValueError("this DPOptimizer has no accountant (pass accountant= and sample_rate=)")
        return self.accountant.get_epsilon(delta)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": dict(self.max_grad_norm) if isinstance(self.max_grad_norm, Mapping)
            else self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "loss_reduction": self.loss_reduction,
            "sample_rate": self.sample_rate,
            "steps_taken": self.steps_taken,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "privacy_plan": self._plan_state(),
            "adaptive_clipping": self.adaptive.state_dict() if self.adaptive is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.noise_multiplier = state["noise_multiplier"]
        self.max_grad_norm = state["max_grad_norm"]
        self.expected_batch_size = state["expected_batch_size"]
        self.loss_reduction = state["loss_reduction"]
        self.sample_rate = state["sample_rate"]
        self.steps_taken = state["steps_taken"]
        if state.get("accountant") is not None and self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        if state.get("privacy_plan") is not None:
            self._load_plan_state(state["privacy_plan"])
        if (state.get("adaptive_clipping") is not None) != (self.adaptive is not None):
            raise ValueError("the checkpoint and this optimizer disagree on max_grad_norm='adaptive'")
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive_clipping"])
            self._initial_c_total = self.max_grad_norm_total

    # logical batches, the target epsilon and mid-run changes (issue 22): StepGuards, step_guards.py

    def __repr__(self) -> str:
        return (f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, {self.loss_reduction}, "
                f"wrapping {type(self.original_optimizer).__name__})")

