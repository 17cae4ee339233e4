"""DPOptimizer's guards (optimizer.py), a mixin: logical batches, the target epsilon and mid-run changes (issue 22;
their state, errors and budget search are guards.py)."""
from __future__ import annotations

from typing import Optional

from ..clip_provenance import clipped_arrivals
from .coverage import clipped_sensitivity, randomized_accounting


class StepGuards:
    """The guards of DPOptimizer.step and the loaders' notes to it (note_physical_batch, note_batches_end).

    It reads the optimizer's settings (noise_multiplier, sample_rate, max_grad_norm_total, accountant, adaptive,
    steps_taken, _calibration) and its parameters (_params, _accounted_params)."""

    # == logical batches, the target epsilon and mid-run changes (issue 22; guards.py) ==========================
    # The rest of DPOptimizer depends on this mixin only through _init_guards, _keep_gradients_on_zero_grad,
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
