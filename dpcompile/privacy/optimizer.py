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

from ..errors import CoverageError

#: id -> parameter, for parameters whose gradients some flashdp graph privatizes (filled by the backend).
#: Keyed by id because tensors compare elementwise; weak so that it keeps no model alive.
PRIVATIZED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def mark_privatized(p: torch.Tensor) -> None:
    PRIVATIZED[id(p)] = p


def is_privatized(p: torch.Tensor) -> bool:
    return PRIVATIZED.get(id(p)) is p


def total_max_grad_norm(max_grad_norm: Union[float, Mapping[str, float]]) -> float:
    """C_total: C itself, or sqrt(sum C_g^2) for per-group thresholds."""
    if isinstance(max_grad_norm, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm.values()))
    return float(max_grad_norm)


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
    """

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, max_grad_norm, expected_batch_size: float,
                 loss_reduction: str = "mean", generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, accountant=None, sample_rate: Optional[float] = None,
                 check_coverage: bool = True):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DPOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
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
                raise CoverageError(
                    f"a parameter of shape {tuple(p.shape)} has a gradient that no flashdp graph produced (its "
                    "gradient was not clipped); compile the model with dpcompile.compile / backend='flashdp' and "
                    "keep every use of the parameter inside it")
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
