"""make_private: model, optimizer and data loader in, their DP versions out (target epsilon -> sigma)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..compile import DPCompiled, compile as dp_compile
from .accounting import PrivacyAccountant, get_noise_multiplier
from .optimizer import DPOptimizer
from .sampling import PoissonDataLoader


class PrivateTraining(NamedTuple):
    model: DPCompiled
    optimizer: DPOptimizer
    data_loader: PoissonDataLoader


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, *,
                 target_epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
                 target_delta: float, epochs: int, max_grad_norm, clipping="per_layer",
                 loss_reduction: str = "mean", max_physical_batch_size: Optional[int] = None,
                 accountant: str = "pld", secure_mode: bool = False, generator: Optional[torch.Generator] = None,
                 backend: str = "flashdp", **backend_options) -> PrivateTraining:
    """Returns (compiled model, DPOptimizer, PoissonDataLoader).

    data_loader: a torch DataLoader (its dataset and batch_size give N and the expected batch size; q = B/N) or
        a PoissonDataLoader. Exactly one of target_epsilon (sigma is calibrated by the accountant, rounding up)
        or noise_multiplier. Training for `epochs` epochs = epochs * len(loader) logical steps.
    Privacy spent so far: `optimizer.get_epsilon(target_delta)`; `optimizer.accountant` holds the history.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon or noise_multiplier")
    if not (0 < target_delta < 1):
        raise ValueError(f"target_delta={target_delta!r} must be in (0, 1)")
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1")
    if isinstance(data_loader, PoissonDataLoader):
        loader = data_loader
    else:
        dataset = data_loader.dataset
        batch_size = getattr(data_loader, "batch_size", None)
        if not batch_size:
            raise ValueError("the data loader needs a batch_size: it sets the expected batch size q*N")
        loader = PoissonDataLoader(dataset, expected_batch_size=batch_size,
                                   max_physical_batch_size=max_physical_batch_size,
                                   generator=None if secure_mode else generator, secure_mode=secure_mode,
                                   collate_fn=getattr(data_loader, "collate_fn", None))
    q = loader.sample_rate
    steps = epochs * len(loader)
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(target_epsilon, target_delta, q, steps, accountant=accountant)
    if target_delta > 1.0 / len(loader.dataset):
        import warnings

        warnings.warn(f"target_delta={target_delta} is larger than 1/N = {1 / len(loader.dataset):.2e}; "
                      "the usual choice is delta << 1/N", stacklevel=2)
    compiled = dp_compile(model, backend=backend, max_grad_norm=max_grad_norm, clipping=clipping,
                          loss_reduction=loss_reduction, **backend_options)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=q * len(loader.dataset), loss_reduction=loss_reduction,
                               generator=None if secure_mode else generator, secure_mode=secure_mode,
                               accountant=PrivacyAccountant(accountant), sample_rate=q)
    dp_optimizer.target_delta = target_delta
    dp_optimizer.planned_steps = steps
    return PrivateTraining(compiled, dp_optimizer, loader)
