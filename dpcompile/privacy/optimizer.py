"""DPOptimizer: the noise half of DP-SGD, around any torch optimizer.

The flashdp graph leaves in every trainable parameter's .grad the sum of per-sample clipped gradients of the batch
it saw (summed again over micro-batches by autograd's accumulation). One logical step of this optimizer:

    g  <-  (clipped sum + N(0, sigma^2 C_total^2 I)) / expected_batch_size      (the division only for "mean")
    inner optimizer step; accountant.step(sigma, q); the noisy gradients are consumed (.grad = None)

Noise is drawn once per logical step, in fp32 whatever the parameter dtype, also for parameters whose .grad is None
(an empty Poisson batch still costs privacy and must still be noised).
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Union

import torch
from torch.optim import Optimizer

from ..clip_provenance import clipped_arrivals, clipped_by_some_graph, grad_problem, provenance, randomized_runs
from ..errors import CoverageError, DPCompileError
from ..randomized_contract import accounting_probes
from .adaptive import (AdaptiveClipping, combined_noise_multiplier, gradient_noise_multiplier, make_adaptive,
                       quantile_noise_multiplier)
from .randomized_accounting import RandomizedSpec

#: relative slack when comparing the graphs' sensitivity with the optimizer's C (sqrt / sums of floats)
SENSITIVITY_RTOL = 1e-9


def is_privatized(p: torch.Tensor) -> bool:
    """Some flashdp graph call delivered a clipped gradient to `p` (clip_provenance.py)."""
    return clipped_by_some_graph(p)


def _graphs_by_set(params) -> dict:
    """frozenset(ids of `params` a graph clipped) -> the graphs over that set, from every graph call that
    delivered a clipped gradient to one of `params` (recorded at run time: a graph reused for another model
    instance counts for that instance's tensors)."""
    members: dict = {}  # graph -> ids of the tensors of `params` it clipped
    for p in params:
        prov = provenance(p)
        for graph in (prov.graphs if prov is not None else ()):
            members.setdefault(graph, set()).add(id(p))
    by_set: dict = {}
    for graph, ids in members.items():
        by_set.setdefault(frozenset(ids), []).append(graph)
    return by_set


def _disjoint(sets) -> bool:
    sets = list(sets)
    return all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])


def clipped_sensitivity(params) -> float:
    """An upper bound on the L2 norm of one sample's clipped gradient over `params` (privatized tensors), from
    the thresholds of every graph that privatized them.

    Graphs over the same parameter set are recompilations (other batch sizes): a sample goes through one of
    them, so their largest sensitivity counts. Graphs over disjoint parameter sets (a model compiled piecewise)
    each add their clipped part: sqrt(sum S^2). If the sets overlap, a parameter may get a clipped part from
    each: the triangle inequality's sum S is the bound.
    """
    by_set = _graphs_by_set(params)
    if not by_set:
        return 0.0
    sens = {key: max(g.sensitivity for g in graphs) for key, graphs in by_set.items()}
    if _disjoint(sens):
        return math.sqrt(sum(s * s for s in sens.values()))
    return sum(sens.values())


def randomized_accounting(params, max_grad_norm_total: float) -> Optional[dict]:
    """What PrivacyAccountant.step needs about the randomized norms of the graphs that privatized `params`:
    {"probes", "variant", "group_weights"}, or None when none of them has a randomized site.

    group_weights: C_g^2 / C^2 (C = max_grad_norm_total, the noise's C) for every clipping group holding a
    randomized site, over all graphs (recompilations of one parameter set count a group once, at its largest
    C_g); None for a single group holding the whole C (flat clipping). probes / variant: those of the graph with
    the fewest effective probes (the accountant switches to the Chernoff envelope itself when the counts that ran
    are not multiples of one another). Graphs over overlapping, unequal parameter sets are refused: their
    sensitivities add up (triangle inequality), outside the per-group analysis."""
    by_set = _graphs_by_set(params)
    groups: dict = {}
    kinds = set()
    for key, graphs in by_set.items():
        for graph in graphs:
            if graph.randomized_groups:
                kinds.add((graph.probes, graph.variant))
                for g, c in graph.randomized_groups.items():
                    groups[(key, g)] = max(groups.get((key, g), 0.0), float(c))
    if not groups:
        return None
    if not _disjoint(by_set):
        raise DPCompileError(
            "randomized norms: the parameters were clipped by graphs over overlapping but different parameter sets "
            "(the same parameter compiled into two different graphs); their randomized sensitivities cannot be "
            "accounted per clipping group. Compile each parameter in one graph")
    probes, variant = min(kinds, key=lambda kv: (accounting_probes(*kv), kv))
    c2 = float(max_grad_norm_total) ** 2
    weights = [c * c / c2 for c in groups.values()]
    if len(weights) == 1 and abs(weights[0] - 1.0) <= 1e-9:
        weights = None  # one group holding the whole threshold: the one-group law
    return {"probes": probes, "variant": variant, "group_weights": weights}


def sensitivity_problem(clipped: list, max_grad_norm_total: float, who: str) -> Optional[DPCompileError]:
    """Why the gradients of `clipped` (privatized tensors) cannot be noised for max_grad_norm_total, or None."""
    bound = clipped_sensitivity(clipped)
    if bound > max_grad_norm_total * (1 + SENSITIVITY_RTOL):
        return DPCompileError(
            f"{who}: the compiled graphs bound one sample's clipped gradient by {bound:.6g} (the root of the sum of "
            f"their squared thresholds), but the noise is calibrated to max_grad_norm={max_grad_norm_total:.6g}: "
            "the gradients would be under-noised. Give the optimizer the max_grad_norm the model was compiled with "
            "(or its per-group dict). Every graph clips to its own max_grad_norm: when a model is compiled as K "
            "separate graphs (FSDP2 units compiled one by one), give each C / sqrt(K), or compile the whole model "
            "as one graph")
    return None


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


def _same_spec(a: dict, b: dict) -> bool:
    def spec(d):
        return RandomizedSpec.make(d["probes"], d["variant"], d.get("group_weights"))

    sa, sb = spec(a), spec(b)
    if sa.probes != sb.probes or (sa.group_weights is None) != (sb.group_weights is None):
        return False
    if sa.group_weights is None:
        return True
    wa, wb = sorted(sa.group_weights), sorted(sb.group_weights)
    return len(wa) == len(wb) and all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in zip(wa, wb))


def total_max_grad_norm(max_grad_norm: Union[float, Mapping[str, float]]) -> float:
    """C_total: C itself, or sqrt(sum C_g^2) for per-group thresholds."""
    if isinstance(max_grad_norm, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm.values()))
    return float(max_grad_norm)


def _uncovered_message(p: torch.Tensor, why: str, name: Optional[str] = None) -> str:
    who = f"parameter `{name}`" if name else f"a parameter of shape {tuple(p.shape)}"
    return (f"{who} has a gradient that cannot be noised as a clipped sum: {why}. Compile the model with "
            "dpcompile.compile / backend='flashdp' and keep every use of the parameter inside one compiled call")


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


class DPOptimizer(Optimizer):
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

    # -- noise -----------------------------------------------------------------------------------------------
    def _noise(self, shape, device, std: float, gen) -> torch.Tensor:
        gen_device = gen.device if gen is not None else device
        if self.secure_mode:  # mean of 4 unit normals, times 2: unit variance, no single float sample exposed
            z = torch.randn((4, *shape), generator=gen, device=gen_device, dtype=torch.float32).sum(0) / 2
        else:
            z = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32)
        return (z * std).to(device)

    def _step_generator(self, device) -> Optional[torch.Generator]:
        if not self.secure_mode:
            return self.generator
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return gen

    # -- checks ----------------------------------------------------------------------------------------------
    def _accounted_params(self) -> list:
        """The privatized tensors whose graphs describe this optimizer's clipping (DistributedDPOptimizer: the
        unsharded parameters for FSDP2 shards)."""
        return [p for p in self._params() if is_privatized(p)]

    def _check_clipping(self) -> None:
        """Coverage and sensitivity, before any gradient is touched."""
        clipped = []
        for p in self._params():
            if p.grad is None:
                continue
            why = grad_problem(p)
            if self.check_coverage and why is not None:
                raise CoverageError(_uncovered_message(p, why, self._name_of(p)))
            if is_privatized(p):
                clipped.append(p)
        if self.adaptive is not None:
            self._check_adaptive(clipped)
        elif self.check_sensitivity and clipped:
            problem = sensitivity_problem(clipped, self.max_grad_norm_total, type(self).__name__)
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

    def _accounting(self) -> dict:
        """The randomized-norm arguments of this step's accountant.step ({} for exact norms), checked before any
        noise is added: an accountant that cannot take them, or gradients from randomized norms that no graph of
        this optimizer's parameters describes, are refused. Sets the probe counts step() tells the accountant."""
        spec = randomized_accounting(self._accounted_params(), self.max_grad_norm_total)
        runs = self._step_runs()
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
        self._check_clipping()
        self._pending_accounting = self._accounting()
        self._noised_sigma = self.noise_multiplier  # what the accountant records for this step (see step)
        std = self.noise_multiplier * self.max_grad_norm_total
        if self.adaptive is not None:  # the gradient's share of the noise: z_D, with the counts' z_b (adaptive.py)
            std = self._release_quantiles() * self.max_grad_norm_total
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        by_device: dict = {}
        for p in self._params():
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

    def _noise_params(self, params: list, device, std: float, scale: float, gen) -> None:
        """(g + N(0, std^2 I)) * scale for every parameter of one device from one draw and a few foreach kernels:
        a loop of per-parameter ops (a draw, casts, an add and a scale each) kept the host busy for as long as the
        compiled step itself took on gpt2-small (benchmarks/NOTES.md, entry 4)."""
        sizes = [p.numel() for p in params]
        noise = self._noise((sum(sizes),), device, std, gen).split(sizes)
        sums = [p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=device) for p in params]
        # out of place: the clipped sums are left as they were (a caller may hold them)
        noisy = torch._foreach_add(sums, [n.view(p.shape) for n, p in zip(noise, params)])
        if scale != 1.0:
            torch._foreach_mul_(noisy, scale)
        for p, g in zip(params, noisy):
            p.grad = g.to(p.dtype)

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

    # == logical batches, the target epsilon and mid-run changes (issue 22; guards.py) ==========================
    # Nothing above depends on this section except through _init_guards, _keep_gradients_on_zero_grad,
    # _skip_or_refuse_step, _check_step_settings, _after_step and the plan in state_dict.

    def _init_guards(self) -> None:
        from .guards import LogicalBatchState

        #: set by make_private(target_epsilon=...): the target, its delta and the planned number of steps
        self.target_epsilon: Optional[float] = None
        self.target_delta: Optional[float] = None
        self.planned_steps: Optional[int] = None
        #: True: a step past the target epsilon is taken (get_epsilon reports the true epsilon) instead of refused
        self.allow_overspend = False
        self._plan: Optional[dict] = None  # {"sigma", "sample_rate", "steps"} that target_epsilon was calibrated for
        self._budget: Optional[tuple] = None  # ((sigma, q, spec), steps left, accountant steps then) of the last search
        self._batches = LogicalBatchState()
        self._initial_c_total = self.max_grad_norm_total
        self._warned_c: set = set()
        self._noised_sigma: Optional[float] = None

    def plan(self, *, target_epsilon: float, target_delta: float, steps: int, allow_overspend: bool = False) -> None:
        """Record that this run's noise_multiplier was calibrated for `target_epsilon` at `target_delta` over
        `steps` steps at the current sample_rate (make_private does it): a step that would take epsilon past the
        target is then refused (PrivacyBudgetExceeded) unless allow_overspend."""
        self.target_epsilon = float(target_epsilon)
        self.target_delta = float(target_delta)
        self.planned_steps = int(steps)
        self.allow_overspend = bool(allow_overspend)
        self._plan = {"sigma": float(self.noise_multiplier), "sample_rate": self.sample_rate, "steps": int(steps)}
        self._budget = None

    def note_physical_batch(self, *, draw: int, sample_rate: Optional[float], first: bool, last: bool,
                            count: int = 1) -> None:
        """Called by the loaders (DPDataLoader, BatchMemoryManager, PoissonDataLoader) before they hand out a
        batch: it belongs to logical batch `draw` (drawn with `sample_rate`), and is its first / last physical
        batch. A logical batch starting while .grad still holds the clipped sums of an earlier one that was never
        stepped on (or of a backward outside any logical batch) is remembered, and the next step() refuses it
        unless zero_grad() discards them first. count: how many micro-batches this hand-out holds (a
        PoissonDataLoader yields a logical batch as a list of them): step() refuses more backward passes than that."""
        st = self._batches
        if first:
            if st.mixed is None and (st.open is None or st.open != st.stepped):
                if self._holds_gradients():
                    st.mixed = (st.open, int(draw))
            st.open, st.index, st.handed = int(draw), 0, int(count)
        else:
            st.index += 1
            st.handed += int(count)
        st.last = bool(last)
        st.sample_rate = None if sample_rate is None else float(sample_rate)

    def note_batches_end(self) -> None:
        """A loader's loop ended (BatchMemoryManager's `with` block). Leaving it in the middle of a logical batch
        whose clipped sums are in .grad makes the next step() refuse them (a cut-off logical batch is not a Poisson
        sample) until zero_grad()."""
        st = self._batches
        if st.open is not None and st.open != st.stepped and not st.last and self._holds_gradients():
            st.cut = st.open
        st.last = True
        st.skip_pending = False

    def _holds_gradients(self) -> bool:
        return any(p.grad is not None for p in self._params())

    def _keep_gradients_on_zero_grad(self) -> bool:
        st = self._batches
        if st.skip_pending:
            return True  # Opacus's semantics: the clipped sums of a logical batch's earlier physical batches stay
        st.mixed = None
        st.cut = None
        return False

    def _skip_or_refuse_step(self) -> bool:
        """True: a physical batch inside a logical batch, nothing to do yet. Raises LogicalBatchError for a step
        that would not be one step over one logical batch; nothing is touched then."""
        from .guards import LogicalBatchError, close

        st = self._batches
        if st.mixed is not None:
            earlier, later = st.mixed
            what = (f"logical batch {earlier}, which was never stepped on," if earlier is not None
                    else "a backward run before the loader handed out any batch")
            raise LogicalBatchError(
                f"{type(self).__name__}.step(): .grad holds the clipped sums of {what} and of logical batch {later}: "
                "one step would noise two logical batches as one, which the accountant does not count (each step "
                "is one Poisson sample). Call optimizer.step() at the end of every logical batch (under "
                "BatchMemoryManager after every physical batch: it steps at the end of each logical batch), or "
                "optimizer.zero_grad() to discard the earlier gradients")
        if st.cut is not None:
            raise LogicalBatchError(
                f"{type(self).__name__}.step(): the loop left logical batch {st.cut} before its last physical batch "
                "(the BatchMemoryManager block ended inside it): its first physical batches are not a Poisson "
                "sample. Call optimizer.zero_grad() to discard them, and finish every logical batch")
        if st.open is None:
            return False
        if st.open == st.stepped:
            raise LogicalBatchError(
                f"{type(self).__name__}.step() was already called for logical batch {st.open}: one step per logical "
                "batch (the accountant counts one Poisson-sampled step each). Call step() once, after the backward "
                "of the logical batch's last physical batch")
        if not st.last:
            st.skip_pending = True
            return True
        handed_out = st.handed
        passes = max((clipped_arrivals(p) for p in self._params() if p.grad is not None), default=0)
        if passes > handed_out:
            raise LogicalBatchError(
                f"{type(self).__name__}.step(): .grad holds {passes} backward passes of compiled calls but the loader "
                f"handed out {handed_out} physical batch{'es' if handed_out > 1 else ''} of logical batch {st.open}: "
                "a micro-batch was counted more than once (its samples' clipped gradients added twice, which the "
                "noise does not cover). Run forward and backward once per physical batch, or "
                "optimizer.zero_grad() to discard these gradients")
        if st.sample_rate is not None and self.sample_rate is not None and not close(st.sample_rate,
                                                                                     float(self.sample_rate)):
            raise LogicalBatchError(
                f"{type(self).__name__}.step(): logical batch {st.open} was drawn with sample_rate={st.sample_rate!r} "
                f"but the optimizer accounts sample_rate={self.sample_rate!r}: the accountant would record a q that "
                "was not used. Change both together (the loader's sample_rate, and the optimizer's sample_rate and "
                "expected_batch_size), between logical batches")
        return False

    def _check_step_settings(self) -> None:
        """sigma and q valid; a changed max_grad_norm that over-noises warned about; the target epsilon kept."""
        import warnings

        from .accounting import _check_rate, _check_sigma

        _check_sigma(self.noise_multiplier)
        if self.sample_rate is not None:
            _check_rate(self.sample_rate)
        c = self.max_grad_norm_total
        if self.adaptive is None and c != self._initial_c_total and c not in self._warned_c:
            self._warned_c.add(c)
            bound = clipped_sensitivity(self._accounted_params())
            if bound > 0 and c > bound * (1 + 1e-6):
                warnings.warn(
                    f"{type(self).__name__}: max_grad_norm changed to {c:.6g}, but the compiled graphs clip to "
                    f"{bound:.6g}: the noise (sigma * {c:.6g}) is {c / bound:.3g}x what they need. Privacy holds (the "
                    "accountant's epsilon is an upper bound), utility suffers. To clip to a new bound, compile the "
                    "model again with that max_grad_norm", stacklevel=3)
        self._check_budget()

    def _check_budget(self) -> None:
        from .accounting import PrivacyAccountant, _randomized_spec
        from .guards import PrivacyBudgetExceeded, steps_within_budget

        acc = self.accountant
        if (self.target_epsilon is None or self.allow_overspend or self._plan is None
                or not isinstance(acc, PrivacyAccountant) or self.sample_rate is None):
            return
        sigma, q, plan = float(self.noise_multiplier), float(self.sample_rate), self._plan
        history = acc.history
        within_plan = (acc.steps + 1 <= plan["steps"] and sigma >= plan["sigma"] and q <= plan["sample_rate"]
                       and all(e[0] >= plan["sigma"] and e[1] <= plan["sample_rate"] for e in history))
        if within_plan:
            return
        spec_args = randomized_accounting(self._accounted_params(), self.max_grad_norm_total)
        spec = None if spec_args is None else _randomized_spec(spec_args["probes"], spec_args["variant"],
                                                               spec_args["group_weights"], "chi2")
        key = (sigma, q, repr(spec))
        delta = self.target_delta
        if self._budget is not None and self._budget[0] == key:
            left = self._budget[1] - (acc.steps - self._budget[2])
            eps_next = None
        else:
            left, eps_next = steps_within_budget(history, sigma, q, spec, self.target_epsilon, delta,
                                                 acc.accountant, acc.value_discretization_interval)
            self._budget = (key, left, acc.steps)
        if left >= 1:
            return
        if eps_next is None:
            eps_next = steps_within_budget(history, sigma, q, spec, self.target_epsilon, delta, acc.accountant,
                                           acc.value_discretization_interval, cap=1)[1]
        raise PrivacyBudgetExceeded(
            f"{type(self).__name__}.step(): step {acc.steps + 1} would take epsilon to {eps_next:.6g} > "
            f"target_epsilon={self.target_epsilon:g} at delta={delta:g} (epsilon spent so far: "
            f"{acc.get_epsilon(delta):.6g}). The noise was calibrated for {plan['steps']} steps at "
            f"sigma={plan['sigma']:.6g}, q={plan['sample_rate']:.6g}; this step has sigma={sigma:.6g}, q={q:.6g}. "
            "Stop training here, or pass allow_overspend=True to make_private (or set "
            "optimizer.allow_overspend = True) to go on: optimizer.get_epsilon(delta) then reports the true epsilon")

    def _after_step(self) -> None:
        st = self._batches
        st.skip_pending = False
        if st.open is not None:
            st.stepped = st.open
        if self.steps_taken == 0 and self._plan is not None and self._calibration is not None:
            self._plan["sigma"] = float(self.noise_multiplier)  # recalibrated for the compiled randomized norms

    def _plan_state(self) -> dict:
        return {"target_epsilon": self.target_epsilon, "target_delta": self.target_delta,
                "planned_steps": self.planned_steps, "allow_overspend": self.allow_overspend,
                "plan": dict(self._plan) if self._plan is not None else None,
                "stepped_draw": self._batches.stepped}

    def _load_plan_state(self, state: dict) -> None:
        from .guards import LogicalBatchState

        self.target_epsilon = state.get("target_epsilon")
        self.target_delta = state.get("target_delta", self.target_delta)
        self.planned_steps = state.get("planned_steps")
        self.allow_overspend = bool(state.get("allow_overspend", False))
        self._plan = dict(state["plan"]) if state.get("plan") is not None else None
        self._budget = None
        self._batches = LogicalBatchState(stepped=state.get("stepped_draw"))
        self._initial_c_total = self.max_grad_norm_total

    def __repr__(self) -> str:
        return (f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, {self.loss_reduction}, "
                f"wrapping {type(self.original_optimizer).__name__})")

