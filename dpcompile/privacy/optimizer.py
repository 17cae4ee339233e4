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
import weakref
from typing import Mapping, Optional, Union

import torch
from torch.optim import Optimizer

from ..errors import CoverageError, DPCompileError

#: id -> parameter, for parameters whose gradients some flashdp graph privatizes (filled by the backend).
#: Keyed by id because tensors compare elementwise; weak so that it keeps no model alive.
PRIVATIZED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


class ClipRecord:
    """One compiled graph's clipping: its per-sample sensitivity sqrt(sum_g C_g^2) over the groups it clips, and
    the ids of the parameters it privatized. Several graphs can privatize disjoint parts of one model (a model
    compiled piecewise, FSDP2 units compiled one by one); each clips to its own thresholds, so the sensitivity of
    the whole gradient is only known from all of them (see `clipped_sensitivity`)."""

    __slots__ = ("sensitivity", "expected", "param_ids")

    def __init__(self, sensitivity: float, expected: int):
        self.sensitivity = float(sensitivity)
        self.expected = expected  # how many parameters the graph privatizes
        self.param_ids: set = set()

    @classmethod
    def from_context(cls, ctx) -> "ClipRecord":
        return cls(math.sqrt(sum(float(c) ** 2 for c in ctx.thresholds.values())), len(ctx.params))


#: id(parameter) -> the ClipRecords of the graphs that privatized it (None for a graph of unknown thresholds)
CLIP_RECORDS: dict = {}
#: the record of the graph being compiled: build_context announces each PassContext to the backend's context
#: listeners just before compiling, and the backend marks that graph's parameters right after (see _Recorder)
_COMPILING: list = [None]


class _Recorder:
    """A backend context listener (the mechanism explain() uses) that keeps the thresholds of the graph being
    compiled, so that mark_privatized, which the backend calls with the parameter alone, can attach them. When
    the backend passes the context to mark_privatized itself this is no longer needed."""

    def append(self, ctx) -> None:
        _COMPILING[0] = ClipRecord.from_context(ctx)


def _install_recorder() -> None:
    from .. import backend

    if not any(isinstance(x, _Recorder) for x in backend._CONTEXT_LISTENERS):
        backend._CONTEXT_LISTENERS.append(_Recorder())


def _forget(pid: int) -> None:
    CLIP_RECORDS.pop(pid, None)


def mark_privatized(p: torch.Tensor, context=None) -> None:
    """Called by the backend once a graph that clips `p`'s gradient compiled. `context`: that graph's PassContext
    (thresholds); without it, the one the recorder saw last."""
    pid = id(p)
    if PRIVATIZED.get(pid) is not p:  # a new tensor (possibly at the id of a dead one): start its history
        CLIP_RECORDS[pid] = []
        weakref.finalize(p, _forget, pid)
    PRIVATIZED[pid] = p
    if context is not None:
        rec = ClipRecord.from_context(context)
    else:
        rec = _COMPILING[0]
        if rec is not None and len(rec.param_ids) >= rec.expected:
            rec = None  # more marks than the announced graph has parameters: the pairing is off, trust nothing
    if rec is not None:
        rec.param_ids.add(pid)
    records = CLIP_RECORDS.setdefault(pid, [])
    if not any(r is rec for r in records):
        records.append(rec)


def is_privatized(p: torch.Tensor) -> bool:
    return PRIVATIZED.get(id(p)) is p


def clipped_sensitivity(params) -> Optional[float]:
    """An upper bound on the L2 norm of one sample's clipped gradient over `params` (privatized tensors), from
    the thresholds of every graph that privatized them; None if a graph's thresholds are unknown.

    Graphs over the same parameter set are recompilations (other batch sizes): a sample goes through one of
    them, so their largest sensitivity counts. Graphs over disjoint parameter sets (a model compiled piecewise)
    each add their clipped part: sqrt(sum S^2). If the sets overlap, a parameter may get a clipped part from
    each: the triangle inequality's sum S is the bound.
    """
    by_set: dict = {}
    for p in params:
        for rec in CLIP_RECORDS.get(id(p), [None]):
            if rec is None:
                return None
            key = frozenset(rec.param_ids)
            by_set[key] = max(by_set.get(key, 0.0), rec.sensitivity)
    if not by_set:
        return 0.0
    sets = list(by_set)
    disjoint = all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])
    if disjoint:
        return math.sqrt(sum(s * s for s in by_set.values()))
    return sum(by_set.values())


def total_max_grad_norm(max_grad_norm: Union[float, Mapping[str, float]]) -> float:
    """C_total: C itself, or sqrt(sum C_g^2) for per-group thresholds."""
    if isinstance(max_grad_norm, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm.values()))
    return float(max_grad_norm)


def _uncovered_message(p: torch.Tensor) -> str:
    return (f"a parameter of shape {tuple(p.shape)} has a gradient that no flashdp graph produced (its gradient "
            "was not clipped); compile the model with dpcompile.compile / backend='flashdp' and keep every use of "
            "the parameter inside it")


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
    independent_ranks: under an initialized torch.distributed group of several ranks this class refuses to be
        built, because it would noise and step each rank's gradient alone (the ranks' models drift apart); use
        dpcompile.DistributedDPOptimizer (make_private picks it). True: each rank is a separate DP run on purpose.
    """

    #: DistributedDPOptimizer sets this: it sums the ranks' clipped sums before noising
    _sums_across_ranks = False

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, max_grad_norm, expected_batch_size: float,
                 loss_reduction: str = "mean", generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, accountant=None, sample_rate: Optional[float] = None,
                 check_coverage: bool = True, independent_ranks: bool = False):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DPOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self._sums_across_ranks:
            _refuse_unsynchronized(optimizer, independent_ranks)
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
        c_total = total_max_grad_norm(max_grad_norm)
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
        self.steps_taken = 0
        # share the inner optimizer's state, so LR schedulers and checkpoints see one optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {})
        self._optimizer_step_post_hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})

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
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def max_grad_norm_total(self) -> float:
        return total_max_grad_norm(self.max_grad_norm)

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

    def add_noise(self) -> None:
        """Noise the clipped sums in place (called by step; exposed for custom loops)."""
        std = self.noise_multiplier * self.max_grad_norm_total
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        gens: dict = {}
        for p in self._params():
            if self.check_coverage and p.grad is not None and not is_privatized(p):
                raise CoverageError(_uncovered_message(p))
            if self.secure_mode:
                gen = gens.setdefault(p.device, self._step_generator(p.device))
            else:
                gen = self.generator
            g = p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=p.device)
            noisy = (g + self._noise(p.shape, p.device, std, gen)) * scale
            p.grad = noisy.to(p.dtype)

    def step(self, closure=None):
        """One logical step: noise once, scale, inner step, account, consume the gradients."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.add_noise()
        out = self.original_optimizer.step()
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1
        # the noisy gradients belong to this step: never let them leak into the next one's sum
        self.original_optimizer.zero_grad(set_to_none=True)
        return out

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

    def __repr__(self) -> str:
        return (f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, {self.loss_reduction}, "
                f"wrapping {type(self.original_optimizer).__name__})")


_install_recorder()
