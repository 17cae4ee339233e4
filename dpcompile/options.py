"""DPOptions: the options of the flashdp backends, their validation and their cache key.

Every field here changes the rewritten graph, so every field is part of `cache_key()`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from . import strategy_registry
from .errors import OptionsError

# Stability constants of the clip functions (the contract's ε and AUTO-S γ). Fixed, not options:
# the oracles in dpcompile.testing import the same values.
CLIP_EPS = 1e-6
AUTO_GAMMA = 1e-2

CLIPPING_STYLES = ("flat", "per_layer", "per_param")
CLIP_FNS = ("abadi", "automatic")
LOSS_REDUCTIONS = ("sum", "mean")
# strategies for linear weight sites: the registry's (dpcompile/strategy_registry.py; built-ins in
# passes/strategies.py). "auto" lets the cost model choose per site among the exact ones; one that is not exact
# ("randomized": probe-estimated norms, docs/randomized.md) changes the privacy analysis, so it is only ever used
# where the user forces it. LINEAR_STRATEGIES and EXACT_LINEAR_STRATEGIES are read from the registry when asked
# for (module __getattr__), so that a strategy registered by user code is accepted too.


def __getattr__(name: str):
    if name == "LINEAR_STRATEGIES":
        return ("auto",) + strategy_registry.option_names()
    if name == "EXACT_LINEAR_STRATEGIES":
        return strategy_registry.exact_option_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_SINGLE_PASS_BUDGET_MB = 256.0
# randomized norms: the probe estimators and the default probe count (k = 32 costs about 9% more sigma)
PROBE_VARIANTS = ("hutchinson", "hutchpp")
DEFAULT_PROBES = 32

Clipping = Union[str, Sequence[Sequence[str]]]


@dataclass(frozen=True)
class DPOptions:
    """Validated options. Build with `DPOptions.parse(dict)`.

    max_grad_norm: total per-sample norm bound C (float; groups get C/sqrt(G)), or a dict of per-group
        thresholds keyed by group name (see `group names` in dpcompile.explain), or "adaptive": the thresholds are
        an input of the compiled graph, read at every call from the DPOptimizer(max_grad_norm="adaptive") that
        manages the parameters (adaptive clipping, docs/privacy.md), and the graph reports how many samples of each
        group were within their threshold. Changing them never recompiles.
    clipping: "flat" | "per_layer" | "per_param" | explicit list of groups of parameter names.
    clip_fn: "abadi" (min(1, C/(|g|+eps))) or "automatic" (C/(|g|+gamma)).
    loss_reduction: "sum" or "mean" (loss = mean over the batch of per-sample losses).
    batch_arg: which forward input carries the batch: None (first tensor input), an argument name, or a position.
    batch_dim: dimension of that input that indexes samples.
    strategy: how linear weight sites get their norms and clipped sums: "auto" (the planner's cheapest),
        "direct", "ghost", "single_pass", "stored", "two_pass", or a dict {parameter-name glob: strategy} to force
        some sites (first matching glob wins; unmatched sites stay "auto"). docs/clipping.md describes each.
        "randomized" estimates the per-sample norms of the sites it is forced on with Gaussian probes
        (DP-SGD-RC, docs/randomized.md): cheaper for long sequences, but the privacy analysis changes (the optimizer
        and accountant are told by the compiled graph); never chosen by "auto". A forced "randomized" site with one
        row per sample (T = 1) is refused: its exact norm is cheaper and costs no privacy.
    single_pass_budget_mb: scratch memory one single_pass site may hold at a time (chunks of samples); "auto" gives
        stored and two_pass only to sites whose per-sample products fit it (a forced site is not held to it).
    probes: k, the matrix-vector products per randomized site and sample (>= 2 effective probes for the accounting:
        hutchinson k >= 2, hutchpp k >= 4, whose accounting uses its k - 2 floor(k/3) residual probes).
    probe_variant: "hutchinson" (k Gaussian probes) or "hutchpp" (Hutch++: exact on per-sample gradients of rank
        <= k // 3, accounted like Hutchinson with k - 2 floor(k/3) probes).
    """

    max_grad_norm: Union[float, tuple, str] = 1.0  # float, sorted tuple of (group, threshold), or "adaptive"
    clipping: Union[str, tuple] = "per_layer"  # style name, or tuple of tuples of names
    clip_fn: str = "abadi"
    loss_reduction: str = "mean"
    batch_arg: Union[None, str, int] = None
    batch_dim: int = 0
    strategy: Union[str, tuple] = "auto"  # name, or tuple of (glob, name)
    single_pass_budget_mb: float = DEFAULT_SINGLE_PASS_BUDGET_MB
    probes: int = DEFAULT_PROBES
    probe_variant: str = "hutchinson"

    KEYS = ("max_grad_norm", "clipping", "clip_fn", "loss_reduction", "batch_arg", "batch_dim", "strategy",
            "single_pass_budget_mb", "probes", "probe_variant")

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "DPOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.KEYS))
        if unknown:
            raise OptionsError(
                f"unknown flashdp option(s) {unknown}; valid options are {list(cls.KEYS)}"
            )
        kw: dict[str, Any] = {}
        if "max_grad_norm" in options:
            kw["max_grad_norm"] = _parse_max_grad_norm(options["max_grad_norm"])
        if "clipping" in options:
            kw["clipping"] = _parse_clipping(options["clipping"])
        for key, allowed in (("clip_fn", CLIP_FNS), ("loss_reduction", LOSS_REDUCTIONS)):
            if key in options:
                value = options[key]
                if value not in allowed:
                    raise OptionsError(f"option {key}={value!r} is invalid; choose one of {list(allowed)}")
                kw[key] = value
        if "batch_arg" in options:
            value = options["batch_arg"]
            if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
                raise OptionsError(f"option batch_arg={value!r} must be None, an argument name or a position")
            if isinstance(value, int) and value < 0:
                raise OptionsError(f"option batch_arg={value!r} must be a non-negative position")
            kw["batch_arg"] = value
        if "batch_dim" in options:
            value = options["batch_dim"]
            if not isinstance(value, int) or isinstance(value, bool):
                raise OptionsError(f"option batch_dim={value!r} must be an int")
            kw["batch_dim"] = value
        if "strategy" in options:
            kw["strategy"] = _parse_strategy(options["strategy"])
        if "single_pass_budget_mb" in options:
            kw["single_pass_budget_mb"] = _positive_float("single_pass_budget_mb", options["single_pass_budget_mb"])
        if "probe_variant" in options:
            value = options["probe_variant"]
            if value not in PROBE_VARIANTS:
                raise OptionsError(f"option probe_variant={value!r} is invalid; choose one of {list(PROBE_VARIANTS)}")
            kw["probe_variant"] = value
        if "probes" in options:
            kw["probes"] = _parse_probes(options["probes"], kw.get("probe_variant", "hutchinson"))
        out = cls(**kw)
        if out.adaptive:
            _check_adaptive(out)
        return out

    @property
    def adaptive(self) -> bool:
        """max_grad_norm="adaptive": the thresholds are a run-time input of the graph (adaptive clipping)."""
        return self.max_grad_norm == ADAPTIVE

    def uses_randomized(self) -> bool:
        """Whether some linear site may be forced to the randomized strategy (changes the privacy analysis)."""
        names = [self.strategy] if isinstance(self.strategy, str) else [s for _, s in self.strategy]
        records = [strategy_registry.find_strategy(s) for s in names]
        return any(r is not None and r.accounting == "randomized" for r in records)

    def forced_strategy(self, name: str) -> str:
        """The strategy the user asked for parameter `name` ("auto" when none)."""
        if isinstance(self.strategy, str):
            return self.strategy
        import fnmatch

        for glob, strategy in self.strategy:
            if fnmatch.fnmatchcase(name, glob):
                return strategy
        return "auto"

    def threshold_for(self, group: str, n_groups: int) -> float:
        """C_g of one group: C/sqrt(G) by default, or the user's per-group value."""
        if self.adaptive:
            raise OptionsError("max_grad_norm='adaptive': the thresholds are chosen at run time by the optimizer")
        if isinstance(self.max_grad_norm, tuple):
            table = dict(self.max_grad_norm)
            if group not in table:
                raise OptionsError(
                    f"max_grad_norm has no threshold for clipping group {group!r}; "
                    f"given groups: {sorted(table)}"
                )
            return table[group]
        return self.max_grad_norm / math.sqrt(n_groups)

    def total_max_grad_norm(self) -> float:
        """C_total: the bound on the whole per-sample gradient norm (what the noise is scaled by)."""
        if self.adaptive:
            raise OptionsError("max_grad_norm='adaptive': the thresholds are chosen at run time by the optimizer")
        if isinstance(self.max_grad_norm, tuple):
            return math.sqrt(sum(c * c for _, c in self.max_grad_norm))
        return self.max_grad_norm

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=repr).encode()).hexdigest()


def infer_batch_input(batch_sizes: Sequence, batch_dim: int = 0) -> int:
    """Which tensor input carries samples when `batch_arg` is not given, from their sizes on the batch dim in call
    order: the first. Refused (OptionsError) when that first size is 1 and another input's is 2 or more: a tensor
    shared by the batch passed first (its leading 1) and a batch of one sample next to a larger input (flattened
    labels, a table) look the same, and either reading of the other would break the per-sample bound (the whole
    batch clipped as one sample, or one sample's gradient clipped in pieces)."""
    first = batch_sizes[0] if batch_sizes else None
    if isinstance(first, int) and first == 1:
        for i, size in enumerate(batch_sizes[1:], start=1):
            if not isinstance(size, int) or size >= 2:  # a symbolic size is a batch of 2 or more
                raise OptionsError(
                    f"flashdp: cannot tell which input carries the samples: the first tensor argument has size 1 on "
                    f"dim {batch_dim} (a tensor shared by the batch, or a batch of one sample?) and tensor argument "
                    f"#{i} has size {size} there. Pass batch_arg=<the name or position of the argument that carries "
                    "the batch> to dpcompile.compile / the backend options, or pass shared tensors after the batch")
    return 0


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"option {name}={value!r} must be a positive number")
    try:
        value = float(value)
    except OverflowError:
        raise OptionsError(f"option {name}={value!r} is too large") from None
    if not (value > 0 and math.isfinite(value)):
        raise OptionsError(f"option {name}={value!r} must be a positive finite number")
    return value


def _parse_probes(value: Any, variant: str) -> int:
    # the accountant needs >= 2 effective probes (the chi^2 envelope's shape k/2 >= 1); Hutch++ with k products has
    # k - 2 floor(k/3) of them, >= 2 from k = 4 on. Whether a count is enough for the target delta is the
    # accountant's call: it refuses counts whose cut-off tail needs sensitivities above 40 C (about 8 or fewer).
    least = 4 if variant == "hutchpp" else 2
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"option probes={value!r} must be an int >= {least}")
    if value < least:
        raise OptionsError(f"option probes={value!r} is too small: probe_variant={variant!r} needs probes >= {least} "
                           "for the privacy accounting (32 or more keeps the extra noise small: docs/randomized.md)")
    return value


#: max_grad_norm="adaptive": run-time thresholds (adaptive clipping)
ADAPTIVE = "adaptive"


def _check_adaptive(opts: "DPOptions") -> None:
    """Combinations adaptive clipping refuses: the quantile estimate needs the exact per-sample norms and the
    abadi clip (under AUTO-S every sample is rescaled, whatever C is), and a strategy that takes the threshold as a
    compile-time number cannot read it at run time."""
    if opts.clip_fn != "abadi":
        raise OptionsError(f"max_grad_norm='adaptive' needs clip_fn='abadi' (got {opts.clip_fn!r}): automatic "
                           "clipping rescales every sample whatever the threshold, so there is no quantile to track")
    if opts.uses_randomized():
        raise OptionsError("max_grad_norm='adaptive' with strategy 'randomized': the quantile of probe-estimated "
                           "norms is not accounted; use an exact strategy")
    names = [opts.strategy] if isinstance(opts.strategy, str) else [s for _, s in opts.strategy]
    for name in names:
        record = strategy_registry.find_strategy(name)
        if record is not None and not record.runtime_threshold:
            raise OptionsError(f"max_grad_norm='adaptive' with strategy {name!r}: that strategy takes the threshold "
                               "as a compile-time number; leave strategy='auto' (or choose another) for run-time "
                               "thresholds")


def _parse_max_grad_norm(value: Any):
    if isinstance(value, str):
        if value != ADAPTIVE:
            raise OptionsError(f"option max_grad_norm={value!r}: a positive number, a dict of per-group "
                               "thresholds, or 'adaptive'")
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)  # the normalised form DPOptions stores
    if isinstance(value, Mapping):
        if not value:
            raise OptionsError("option max_grad_norm: a dict of per-group thresholds must not be empty")
        out = []
        for group, c in value.items():
            if not isinstance(group, str):
                raise OptionsError(f"option max_grad_norm: group names must be str, got {group!r}")
            out.append((group, _positive_float(f"max_grad_norm[{group!r}]", c)))
        return tuple(sorted(out))
    return _positive_float("max_grad_norm", value)


def _parse_clipping(value: Any):
    if isinstance(value, str):
        if value not in CLIPPING_STYLES:
            raise OptionsError(
                f"option clipping={value!r} is invalid; choose one of {list(CLIPPING_STYLES)} "
                "or give a list of groups of parameter names"
            )
        return value
    if not isinstance(value, Sequence) or not value:
        raise OptionsError(f"option clipping={value!r} must be a style name or a non-empty list of groups")
    groups = []
    seen: set[str] = set()
    for i, group in enumerate(value):
        if isinstance(group, str) or not isinstance(group, Sequence) or not group:
            raise OptionsError(f"option clipping: group {i} must be a non-empty list of parameter names, got {group!r}")
        for name in group:
            if not isinstance(name, str):
                raise OptionsError(f"option clipping: group {i} holds a non-string name {name!r}")
            if name in seen:
                raise OptionsError(f"option clipping: parameter {name!r} is listed in two groups")
            seen.add(name)
        groups.append(tuple(group))
    return tuple(groups)


def _parse_strategy(value: Any):
    names = __getattr__("LINEAR_STRATEGIES")

    def check(v, where):
        if v not in names:
            raise OptionsError(f"option {where}={v!r} is invalid; choose one of {list(names)}")
        return v

    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)  # the normalised form DPOptions stores
    if isinstance(value, str):
        return check(value, "strategy")
    if isinstance(value, Mapping) and value:
        out = []
        for glob, v in value.items():
            if not isinstance(glob, str):
                raise OptionsError(f"option strategy: keys must be parameter-name globs (str), got {glob!r}")
            out.append((glob, check(v, f"strategy[{glob!r}]")))
        return tuple(out)  # order kept: the first matching glob wins
    raise OptionsError(f"option strategy={value!r} must be one of {list(names)} or a non-empty dict "
                       "{parameter-name glob: strategy}")
