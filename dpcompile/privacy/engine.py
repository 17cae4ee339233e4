"""make_private: model, optimizer and data loader in, their DP versions out (target epsilon -> sigma)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..compile import DPCompiled, compile as dp_compile
from ..errors import DPCompileError
from . import distributed as _dist
from .accounting import PrivacyAccountant, get_noise_multiplier
from .optimizer import DPOptimizer
from .sampling import PoissonDataLoader


class PrivateTraining(NamedTuple):
    model: DPCompiled  # under FSDP2: the fully_shard module itself, its forward compiled in place
    optimizer: DPOptimizer
    data_loader: PoissonDataLoader


def _global_batch_size(data_loader, world_size: int) -> int:
    """The expected logical batch size over all ranks that a torch DataLoader asks for: its batch_size, or
    batch_size * num_replicas when a DistributedSampler shows that batch_size is per rank."""
    batch_size = getattr(data_loader, "batch_size", None)
    if not batch_size:
        raise ValueError("the data loader needs a batch_size: it sets the expected batch size q*N")
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(data_loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        if sampler.num_replicas != world_size:
            raise DPCompileError(f"the data loader's DistributedSampler has num_replicas={sampler.num_replicas}, "
                                 f"but the process group has {world_size} ranks")
        return batch_size * sampler.num_replicas
    return batch_size


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, *,
                 target_epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
                 target_delta: float, epochs: int, max_grad_norm, clipping="per_layer",
                 loss_reduction: str = "mean", max_physical_batch_size: Optional[int] = None,
                 accountant: str = "pld", secure_mode: bool = False, generator: Optional[torch.Generator] = None,
                 backend: str = "flashdp", process_group=None, **backend_options) -> PrivateTraining:
    """Returns (compiled model, DPOptimizer, PoissonDataLoader).

    data_loader: a torch DataLoader (its dataset and batch_size give N and the expected batch size; q = B/N) or
        a PoissonDataLoader. Exactly one of target_epsilon (sigma is calibrated by the accountant, rounding up)
        or noise_multiplier. Training for `epochs` epochs = epochs * len(loader) logical steps.
    Privacy spent so far: `optimizer.get_epsilon(target_delta)`; `optimizer.accountant` holds the history.

    Under an initialized torch.distributed group (torchrun; `process_group`, default WORLD) the same call trains
    data-parallel: the batch size is the *global* expected batch (a DataLoader with a DistributedSampler gives a
    per-rank batch_size, multiplied by the number of ranks), each rank gets a DistributedPoissonDataLoader share of
    every global Poisson batch, the optimizer is a DistributedDPOptimizer (clipped sums summed over ranks, noise
    once), and the accountant counts the global q. A model sharded with FSDP2 fully_shard (at its root only) gets
    its forward compiled in place, FSDP's hooks around it. See docs/distributed.md.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon or noise_multiplier")
    if not (0 < target_delta < 1):
        raise ValueError(f"target_delta={target_delta!r} must be in (0, 1)")
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1")
    group = _dist.active_process_group(process_group)
    if group is not None:
        _dist.refuse_unsupported_wrappers(model)
        loader = _distributed_loader(data_loader, group, max_physical_batch_size, secure_mode, generator)
    elif isinstance(data_loader, PoissonDataLoader):
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
    options = dict(max_grad_norm=max_grad_norm, clipping=clipping, loss_reduction=loss_reduction,
                   **backend_options)
    randomized = predict_randomized_accounting(model, options)
    if randomized is not None and accountant != "pld":
        raise DPCompileError(f"make_private: strategy 'randomized' (probe-estimated norms) is accounted with "
                             f"accountant='pld' only, not {accountant!r}")
    calibration = None
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(target_epsilon, target_delta, q, steps, accountant=accountant,
                                                **(randomized or {}))
        if randomized is not None:
            calibration = dict(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                               accountant=accountant, spec=randomized)
    if target_delta > 1.0 / len(loader.dataset):
        import warnings

        warnings.warn(f"target_delta={target_delta} is larger than 1/N = {1 / len(loader.dataset):.2e}; "
                      "the usual choice is delta << 1/N", stacklevel=2)
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=q * len(loader.dataset), loss_reduction=loss_reduction,
                  generator=None if secure_mode else generator, secure_mode=secure_mode,
                  accountant=PrivacyAccountant(accountant), sample_rate=q)
    if group is None:
        compiled = dp_compile(model, backend=backend, **options)
        dp_optimizer = DPOptimizer(optimizer, **common)
    else:
        if _dist.is_fsdp2_module(model):
            nested = [n for n, m in model.named_modules() if n and _dist.is_fsdp2_module(m)]
            if nested:
                raise DPCompileError(
                    f"make_private compiles the whole model as one graph, but this FSDP2 model has fully_shard units "
                    f"below its root ({', '.join(nested[:4])}{' ...' if len(nested) > 4 else ''}), whose hooks "
                    "would split that graph. Either fully_shard only the root, or compile each unit yourself "
                    "(dpcompile.privacy.distributed.compile_forward, max_grad_norm C/sqrt(#graphs) each) and use "
                    "DistributedDPOptimizer and DistributedPoissonDataLoader directly: docs/distributed.md")
            compiled = _dist.compile_forward(model, backend=backend, **options)
        else:
            compiled = dp_compile(model, backend=backend, **options)
        # an FSDP2 root's units are set to sum (not average) here, before any backward
        dp_optimizer = _dist.DistributedDPOptimizer(optimizer, module=model, process_group=group, **common)
    dp_optimizer.target_delta = target_delta
    dp_optimizer.planned_steps = steps
    dp_optimizer._calibration = calibration
    return PrivateTraining(compiled, dp_optimizer, loader)


def predict_randomized_accounting(model: nn.Module, options: dict) -> Optional[dict]:
    """What the accountant will be told about randomized norms (see privacy.optimizer.randomized_accounting), as
    predicted before anything is compiled, from the module tree: the weights of nn.Linear / Conv1D modules that a
    'randomized' strategy glob matches and that no other module shares, in their clipping groups. The optimizer
    replaces the prediction by the compiled graphs' own description before its first step (and searches sigma
    again if they differ). None when no strategy asks for randomized norms."""
    from ..backend import _groups_of
    from ..options import DPOptions

    opts = DPOptions.parse(options)
    if not opts.uses_randomized():
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    uses: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    linear_weights = set()
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            w = module._parameters.get("weight")
            if w is not None:
                linear_weights.add(id(w))
    groups = _groups_of([n for n, _ in named], dict(model.named_parameters()), opts)
    n_groups = len(set(groups.values()))
    chosen = {groups[n] for n, p in named if opts.forced_strategy(n) == "randomized" and id(p) in linear_weights
              and uses[id(p)] == 1}
    if not chosen:
        return None
    c2 = opts.total_max_grad_norm() ** 2
    weights = [opts.threshold_for(g, n_groups) ** 2 / c2 for g in sorted(chosen)]
    if len(weights) == 1 and abs(weights[0] - 1.0) <= 1e-9:
        weights = None
    return {"probes": opts.probes, "variant": opts.probe_variant, "group_weights": weights}


def _distributed_loader(data_loader, group, max_physical_batch_size, secure_mode, generator):
    """This rank's DistributedPoissonDataLoader for the global logical batch the given loader describes."""
    import torch.distributed as dist

    if isinstance(data_loader, _dist.DistributedPoissonDataLoader):
        return data_loader
    if isinstance(data_loader, PoissonDataLoader):
        # a plain PoissonDataLoader would give every rank the whole logical batch: share it out instead
        return _dist.DistributedPoissonDataLoader(
            data_loader.dataset, data_loader.sample_rate, process_group=group,
            max_physical_batch_size=data_loader.max_physical_batch_size, steps=data_loader.steps,
            generator=data_loader.generator, secure_mode=data_loader.secure_mode,
            collate_fn=None if data_loader._fast_tensors else data_loader.collate_fn)
    batch_size = _global_batch_size(data_loader, dist.get_world_size(group))
    return _dist.DistributedPoissonDataLoader(
        data_loader.dataset, expected_batch_size=batch_size, process_group=group,
        max_physical_batch_size=max_physical_batch_size, generator=None if secure_mode else generator,
        secure_mode=secure_mode, collate_fn=getattr(data_loader, "collate_fn", None))
