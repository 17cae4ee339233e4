"""Checkpoints of a DP training run: one file that resumes the model, the optimizer, the privacy spent and the
sampling stream.

    save_checkpoint(path, module=model, optimizer=optimizer, data_loader=loader, extra={"epoch": 3})
    ...
    extra = load_checkpoint(path, module=model, optimizer=optimizer, data_loader=loader)["extra"]

The file is a `torch.save` of one dict (loadable with `torch.load(path, weights_only=True)`: tensors, numbers,
strings, lists and dicts only):

    format, version       "dpcompile.checkpoint", 1
    module                the model's state_dict (of the module itself, not of a compiled wrapper), or None when
                          module=None was passed because the weights are saved elsewhere (`dpcompile train` and
                          DPTrainer keep them in the transformers checkpoint next to this file)
    optimizer             DPOptimizer.state_dict(): the wrapped optimizer's state_dict, noise_multiplier,
                          max_grad_norm, expected_batch_size, loss_reduction, sample_rate, steps_taken, the noise
                          generator's state, the accountant, and the privacy plan (target epsilon and delta,
                          planned steps, allow_overspend, the sigma and q it was calibrated for, the draw number
                          of the last logical batch stepped on), and under max_grad_norm="adaptive" the adaptive
                          clipping state (each group's current threshold, the update count, gamma, eta, sigma_b)
    accountant            PrivacyAccountant.state_dict(): its kind, PLD interval, and its history, one entry
                          [sigma, q, count] per run of equal steps, or [sigma, q, count, randomized] for steps with
                          randomized norms (probes, variant, group weights, envelope), and the count of steps that
                          ran randomized norms unaccounted (the same as in `optimizer`; readers need no optimizer)
    sampler               PoissonBatchSampler.state_dict(position): N, q, steps per pass, secure_mode, and the
                          generator state before `draws`, the first logical batch the optimizer did not step on
                          (a DataLoader's workers may have drawn beyond it; an optimizer no loader told about
                          its batches gives the sampler's current position); None without a Poisson loader
    epsilon               {"delta": target delta, "epsilon": spent}, for reading only (None if unknown)
    extra                 whatever the caller passed (epoch, LR scheduler state, ...)

Loading restores each part given, checks the format, and makes the loader's next pass the rest of the pass the
checkpoint was taken in. Secure-mode sampling and noise cannot be replayed: their checkpoint keeps the position
only, and a resumed run draws fresh randomness (which is what secure mode is for).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_state", "restore_checkpoint", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "dpcompile.checkpoint"
CHECKPOINT_VERSION = 1


def _module_of(module) -> nn.Module:
    """The nn.Module whose state a checkpoint holds: a DPCompiled's module, a torch.compile wrapper's _orig_mod."""
    inner = getattr(module, "module", None)
    if not isinstance(module, nn.Module) and isinstance(inner, nn.Module):
        module = inner
    orig = getattr(module, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        module = orig
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (or what dpcompile.compile returned), got "
                        f"{type(module).__name__}")
    return module


def _sampler_of(data_loader):
    """The PoissonBatchSampler behind a DPDataLoader, PoissonDataLoader, BatchMemoryManager, or the sampler itself."""
    from .sampling import BatchMemoryManager, PoissonBatchSampler

    if data_loader is None or isinstance(data_loader, PoissonBatchSampler):
        return data_loader
    if isinstance(data_loader, BatchMemoryManager):
        data_loader = data_loader.data_loader
    sampler = getattr(data_loader, "batch_sampler", None)
    if not isinstance(sampler, PoissonBatchSampler):
        raise TypeError(f"data_loader: a Poisson loader (DPDataLoader, PoissonDataLoader, BatchMemoryManager or "
                        f"PoissonBatchSampler) was expected, got {type(data_loader).__name__}")
    return sampler


def _accountant_of(optimizer):
    return getattr(optimizer, "accountant", None) if optimizer is not None else None


def checkpoint_state(*, module, optimizer=None, data_loader=None, extra: Any = None) -> dict:
    """The dict `save_checkpoint` writes (see the module docstring). module=None leaves the weights out (saved
    elsewhere, e.g. by `save_pretrained` next to the checkpoint)."""
    sampler = _sampler_of(data_loader)
    accountant = _accountant_of(optimizer)
    sampler_state = None
    if sampler is not None:
        batches = getattr(optimizer, "_batches", None)
        stepped = getattr(batches, "stepped", None)
        sampler_state = sampler.state_dict(None if stepped is None else stepped + 1)
    epsilon = None
    delta = getattr(optimizer, "target_delta", None)
    if accountant is not None and delta is not None:
        try:
            epsilon = {"delta": float(delta), "epsilon": float(accountant.get_epsilon(delta))}
        except Exception:  # noqa: BLE001 (informational only; e.g. unaccounted randomized steps refuse)
            epsilon = None
        if epsilon is not None and math.isinf(epsilon["epsilon"]):
            epsilon["epsilon"] = float("inf")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "module": _module_of(module).state_dict() if module is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "accountant": accountant.state_dict() if hasattr(accountant, "state_dict") else None,
        "sampler": sampler_state,
        "epsilon": epsilon,
        "extra": extra,
    }


def save_checkpoint(path, *, module, optimizer=None, data_loader=None, extra: Any = None,
                    **torch_save_kwargs) -> dict:
    """Write the model, the DPOptimizer (with its accountant and noise generator), the sampler's stream and
    `extra` to `path` (written to a temporary file first, then renamed: a crash leaves the old checkpoint).
    Take it between steps (after optimizer.step()). Returns the dict written."""
    state = checkpoint_state(module=module, optimizer=optimizer, data_loader=data_loader, extra=extra)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp, **torch_save_kwargs)
    os.replace(tmp, path)
    return state


def restore_checkpoint(state: dict, *, module=None, optimizer=None, data_loader=None, strict: bool = True) -> dict:
    """Restore the parts given from a checkpoint dict (as checkpoint_state made it); returns it."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a dpcompile checkpoint (no format 'dpcompile.checkpoint'); write it with "
                         "dpcompile.save_checkpoint / PrivacyEngine.save_checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state['version']} is newer than this dpcompile reads "
                         f"({CHECKPOINT_VERSION})")
    if module is not None:
        if state.get("module") is None:
            raise ValueError("the checkpoint holds no model weights (it was saved with module=None: the weights are "
                             "in the model checkpoint saved next to it); load them from there")
        _module_of(module).load_state_dict(state["module"], strict=strict)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise ValueError("the checkpoint holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
        accountant = _accountant_of(optimizer)
        if accountant is not None and state.get("accountant") is not None and state["optimizer"].get(
                "accountant") is None:
            accountant.load_state_dict(state["accountant"])
    sampler = _sampler_of(data_loader)
    if sampler is not None:
        if state.get("sampler") is None:
            raise ValueError("the checkpoint holds no sampler state (it was saved without data_loader=)")
        sampler.load_state_dict(state["sampler"])
    return state


def load_checkpoint(path, *, module=None, optimizer=None, data_loader=None, map_location="cpu", strict: bool = True,
                    weights_only: bool = True) -> dict:
    """Read `path` (torch.load, weights_only by default) and restore the model, the DPOptimizer (its accountant
    history, noise generator and plan), and the loader's sampling stream; returns the checkpoint dict (its
    "extra" is what save_checkpoint got)."""
    state = torch.load(os.fspath(path), map_location=map_location, weights_only=weights_only)
    return restore_checkpoint(state, module=module, optimizer=optimizer, data_loader=data_loader, strict=strict)
