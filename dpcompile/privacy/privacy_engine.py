"""PrivacyEngine: Opacus's front door over dpcompile.make_private, so that an Opacus script ports by its imports.

    privacy_engine = dpcompile.PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, epochs=EPOCHS,
        target_epsilon=EPSILON, target_delta=DELTA, max_grad_norm=MAX_GRAD_NORM)
    with dpcompile.BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=128,
                                      optimizer=optimizer) as loader:
        for x, y in loader:
            optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
    privacy_engine.get_epsilon(DELTA)

What differs from Opacus (docs/porting-from-opacus.md): the model is compiled (the returned model is a
dpcompile.DPCompiled around your module: call it, .train(), .eval(), .parameters() as before) and the per-sample
clipping runs inside its backward; clipping "flat" (the default here, as in Opacus) or dpcompile's "per_layer" /
"per_param" styles with one max_grad_norm; accountants "pld" (default; "prv" is taken as "pld": both compute the
privacy loss distribution numerically) and "rdp"; Poisson sampling only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import DPCompileError
from .accounting import PrivacyAccountant
from .engine import make_private
from .sampling import DPDataLoader

__all__ = ["PrivacyEngine"]

_ACCOUNTANTS = {"pld": "pld", "prv": "pld", "rdp": "rdp"}
_GRAD_SAMPLE_MODES = (None, "hooks", "functorch", "ew", "ghost", "flash", "flash_fuse")


class PrivacyEngine:
    """Opacus-shaped: PrivacyEngine(accountant="pld", secure_mode=False), then make_private(...) or
    make_private_with_epsilon(...), get_epsilon(delta), save_checkpoint(...) / load_checkpoint(...).

    accountant: "pld" (default), "prv" (answered by PLD) or "rdp". secure_mode: sampling from os.urandom and
    noise from OS-seeded generators (docs/privacy.md says what it does and does not protect). Without secure_mode
    the sampling generator is seeded with torch.randint(2**62) drawn from the data loader's generator if it has
    one, else from torch's global generator, and the noise comes from noise_generator (default: torch's global
    generator), so a script that calls torch.manual_seed first runs the same way twice, as with Opacus."""

    def __init__(self, accountant: str = "pld", secure_mode: bool = False) -> None:
        if accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant={accountant!r}: dpcompile accounts with 'pld' (default; 'prv' is taken as "
                             "'pld': both compute the privacy loss distribution numerically) or 'rdp'")
        self.accountant_name = _ACCOUNTANTS[accountant]
        self.secure_mode = bool(secure_mode)
        #: the accountant of the last make_private (its optimizer's); a fresh one before
        self.accountant = PrivacyAccountant(self.accountant_name)
        self.module = None
        self.optimizer = None
        self.data_loader: Optional[DPDataLoader] = None

    # -- make_private --------------------------------------------------------------------------------------
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader, noise_multiplier: float,
                     max_grad_norm, batch_first: bool = True, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, clipping: str = "flat",
                     noise_generator: Optional[torch.Generator] = None, grad_sample_mode: Optional[str] = None,
                     criterion: Optional[nn.Module] = None, backend: str = "auto", **backend_options):
        """(model, optimizer, data_loader) as Opacus returns them, for a given noise multiplier:

        model: `module` compiled with the flashdp backend ("auto": Inductor on CUDA, eager AOT on a CPU), clipping
            per sample inside its backward to max_grad_norm (one number; `clipping` "flat", "per_layer" or
            "per_param" split it over groups, see docs/clipping.md). loss_reduction: "mean" when the loss is the
            batch mean of per-sample losses (nn.CrossEntropyLoss()), "sum" for a sum.
        optimizer: a DPOptimizer around `optimizer` (noise once per logical batch, accountant).
        data_loader: a DPDataLoader keeping data_loader's dataset, collate_fn and settings (workers, pinned
            memory), with Poisson batches of expected size data_loader.batch_size.
        grad_sample_mode: accepted for Opacus scripts; the compiled backward replaces every mode. With "ghost"
            the result is (model, optimizer, criterion, data_loader), as Opacus returns it. Any other keyword goes
            to the backend (docs/gradient-contract.md)."""
        return self._make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  batch_first=batch_first, loss_reduction=loss_reduction,
                                  poisson_sampling=poisson_sampling, clipping=clipping,
                                  noise_generator=noise_generator, grad_sample_mode=grad_sample_mode,
                                  criterion=criterion, backend=backend, backend_options=backend_options)

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                                  target_epsilon: float, target_delta: float, epochs: int, max_grad_norm,
                                  batch_first: bool = True, loss_reduction: str = "mean",
                                  poisson_sampling: bool = True, clipping: str = "flat",
                                  noise_generator: Optional[torch.Generator] = None,
                                  grad_sample_mode: Optional[str] = None, criterion: Optional[nn.Module] = None,
                                  epsilon_tolerance: float = 0.01, allow_overspend: bool = False,
                                  backend: str = "auto", **backend_options):
        """make_private with the noise multiplier calibrated (PLD, rounding up) so that epochs * len(data_loader)
        steps spend at most target_epsilon at target_delta. A step past that budget is refused
        (dpcompile.PrivacyBudgetExceeded) unless allow_overspend=True, in which case get_epsilon reports the
        true epsilon."""
        return self._make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                  target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
                                  max_grad_norm=max_grad_norm, batch_first=batch_first,
                                  loss_reduction=loss_reduction, poisson_sampling=poisson_sampling,
                                  clipping=clipping, noise_generator=noise_generator,
                                  grad_sample_mode=grad_sample_mode, criterion=criterion,
                                  epsilon_tolerance=epsilon_tolerance, allow_overspend=allow_overspend,
                                  backend=backend, backend_options=backend_options)

    def _sampling_generator(self, data_loader) -> Optional[torch.Generator]:
        if self.secure_mode:
            return None
        source = getattr(data_loader, "generator", None)
        device = source.device if isinstance(source, torch.Generator) else "cpu"
        # the loader's generator, or torch's global one
        seed = torch.randint(0, 2 ** 62, (1,), generator=source, device=device).item()
        return torch.Generator().manual_seed(int(seed))

    def _make_private(self, *, module, optimizer, data_loader, max_grad_norm, batch_first, loss_reduction,
                      poisson_sampling, clipping, noise_generator, grad_sample_mode, criterion, backend,
                      backend_options, noise_multiplier=None, target_epsilon=None, target_delta=None, epochs=None,
                      epsilon_tolerance=0.01, allow_overspend=False):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not poisson_sampling:
            raise ValueError("poisson_sampling=False: dpcompile's accountants assume Poisson sampling, which the "
                             "data loader returned by make_private does; shuffled fixed-size batches would not match "
                             "the epsilon reported. Drop the argument")
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError("max_grad_norm: one number (Opacus's per-layer list of thresholds has no equivalent "
                             "here): clipping='per_layer' splits it into C/sqrt(G) per layer, or give the backend a "
                             "dict {group: C_g} (docs/clipping.md)")
        if grad_sample_mode not in _GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r} is unknown; the compiled backward replaces "
                             f"every Opacus mode (one of {_GRAD_SAMPLE_MODES[1:]} or None)")
        if grad_sample_mode == "ghost" and criterion is None:
            raise ValueError("grad_sample_mode='ghost' returns the criterion too, as in Opacus: pass criterion=")
        if self.secure_mode and noise_generator is not None:
            raise ValueError("secure_mode draws the noise from OS-seeded generators: do not pass noise_generator")
        if not batch_first:
            backend_options.setdefault("batch_dim", 1)
        params = {id(p) for p in module.parameters()}
        stray = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in params]
        if stray:
            raise DPCompileError(f"the optimizer holds {len(stray)} tensor(s) that are not parameters of the module "
                                 "(their gradients would not be clipped): build the optimizer from "
                                 "module.parameters()")
        if not isinstance(data_loader, DPDataLoader):
            data_loader = DPDataLoader.from_data_loader(data_loader, generator=self._sampling_generator(data_loader),
                                                        secure_mode=self.secure_mode)
        elif data_loader.batch_sampler.secure_mode != self.secure_mode:
            raise ValueError(f"the DPDataLoader has secure_mode={data_loader.batch_sampler.secure_mode}, the engine "
                             f"{self.secure_mode}")
        model, dp_optimizer, loader = make_private(
            module, optimizer, data_loader, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
            target_delta=target_delta, epochs=epochs, max_grad_norm=max_grad_norm, clipping=clipping,
            loss_reduction=loss_reduction, accountant=self.accountant_name, secure_mode=self.secure_mode,
            generator=noise_generator, backend=backend, allow_overspend=allow_overspend,
            epsilon_tolerance=epsilon_tolerance, **backend_options)
        self.module, self.optimizer, self.data_loader = model, dp_optimizer, loader
        self.accountant = dp_optimizer.accountant
        if grad_sample_mode == "ghost":
            return model, dp_optimizer, criterion, loader
        return model, dp_optimizer, loader

    # -- privacy spent -------------------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (every step the optimizer took, at the sigma and q it had)."""
        return self.accountant.get_epsilon(delta)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, *, path, module, optimizer=None, noise_scheduler=None, grad_clip_scheduler=None,
                        checkpoint_dict: Optional[dict] = None, module_state_dict_kwargs: Optional[dict] = None,
                        torch_save_kwargs: Optional[dict] = None) -> None:
        """Write the model, the optimizer (DPOptimizer state, accountant history, noise generator), the sampling
        stream of the engine's data loader, and checkpoint_dict (returned by load_checkpoint) to `path`: the
        format of dpcompile.save_checkpoint (docs/privacy.md). Schedulers are saved through their state_dict()."""
        from .checkpoint import save_checkpoint

        extra = dict(checkpoint_dict or {})
        for name, sched in (("noise_scheduler", noise_scheduler), ("grad_clip_scheduler", grad_clip_scheduler)):
            if sched is not None:
                extra[name] = sched.state_dict()
        if module_state_dict_kwargs:
            raise ValueError("module_state_dict_kwargs is not supported: the module's state_dict() is saved")
        save_checkpoint(path, module=module, optimizer=optimizer if optimizer is not None else None,
                        data_loader=self.data_loader, extra=extra, **(torch_save_kwargs or {}))

    def load_checkpoint(self, *, path, module, optimizer=None, noise_scheduler=None, grad_clip_scheduler=None,
                        module_load_dict_kwargs: Optional[dict] = None,
                        torch_load_kwargs: Optional[dict] = None) -> dict:
        """Restore what save_checkpoint wrote into module, optimizer (or, without one, the engine's accountant)
        and the engine's data loader (the next pass continues the sampling stream); returns checkpoint_dict."""
        from .checkpoint import load_checkpoint, restore_checkpoint

        kwargs = dict(torch_load_kwargs or {})
        strict = (module_load_dict_kwargs or {}).get("strict", True)
        state = load_checkpoint(path, **kwargs)
        restore_checkpoint(state, module=module, optimizer=optimizer, data_loader=self.data_loader, strict=strict)
        if optimizer is None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        elif optimizer is not None and getattr(optimizer, "accountant", None) is not None:
            self.accountant = optimizer.accountant
        extra = dict(state.get("extra") or {})
        for name, sched in (("noise_scheduler", noise_scheduler), ("grad_clip_scheduler", grad_clip_scheduler)):
            if sched is not None and name in extra:
                sched.load_state_dict(extra.pop(name))
        return extra

    def __repr__(self) -> str:
        return (f"PrivacyEngine(accountant={self.accountant_name!r}, secure_mode={self.secure_mode}, "
                f"steps={self.accountant.steps})")
