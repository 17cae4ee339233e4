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
    data_loader: PoissonDataLoader  # or the DPDataLoader given


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


def resolve_backend(backend: str, model: nn.Module) -> str:
    """"auto": "flashdp" (Inductor) when the model's parameters are on a CUDA device, else "flashdp_eager" (no code
    generation: on a CPU, Inductor compiled a 2-layer MLP in 49 s against 6 s); any other name as given."""
    if backend != "auto":
        return backend
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return "flashdp" if device.type == "cuda" else "flashdp_eager"


def _poisson_loader(data_loader, max_physical_batch_size, secure_mode, generator):
    """The Poisson loader make_private trains with: a DPDataLoader or PoissonDataLoader as it is, or for a torch
    DataLoader a PoissonDataLoader over its dataset with its collate_fn and settings (workers, pinned memory, ...)
    and q = batch_size / N."""
    from torch.utils.data import DataLoader

    from .sampling import DPDataLoader, _loader_settings, _user_collate, _warn_ignored_settings

    if isinstance(data_loader, (PoissonDataLoader, DPDataLoader)):
        return data_loader
    dataset = data_loader.dataset
    batch_size = getattr(data_loader, "batch_size", None)
    if not batch_size:
        raise ValueError("the data loader needs a batch_size: it sets the expected batch size q*N")
    settings = {}
    if isinstance(data_loader, DataLoader):
        _warn_ignored_settings(data_loader, stacklevel=4)
        settings = _loader_settings(data_loader)
        settings["worker_generator"] = settings.pop("generator")
    return PoissonDataLoader(dataset, expected_batch_size=batch_size, max_physical_batch_size=max_physical_batch_size,
                             generator=None if secure_mode else generator, secure_mode=secure_mode,
                             collate_fn=_user_collate(data_loader) if isinstance(data_loader, DataLoader)
                             else getattr(data_loader, "collate_fn", None), **settings)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, *,
                 target_epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
                 target_delta: Optional[float] = None, epochs: Optional[int] = None, max_grad_norm,
                 clipping="per_layer", loss_reduction: str = "mean", max_physical_batch_size: Optional[int] = None,
                 accountant: str = "pld", secure_mode: bool = False, generator: Optional[torch.Generator] = None,
                 backend: str = "auto", process_group=None, allow_overspend: bool = False,
                 epsilon_tolerance: float = 0.01, **backend_options) -> PrivateTraining:
    """Returns (compiled model, DPOptimizer, Poisson data loader).

    data_loader: a torch DataLoader (its dataset and batch_size give N and the expected batch size, q = B/N; its
        collate_fn, num_workers, pin_memory and other settings are kept: the result is a PoissonDataLoader that
        yields each logical batch as a list of micro-batches of at most max_physical_batch_size), or a
        PoissonDataLoader / DPDataLoader, used as it is.
    Exactly one of target_epsilon (sigma is calibrated by the accountant, rounding up, for epochs * len(loader)
    logical steps; target_delta and epochs required) or noise_multiplier (epochs and target_delta optional).
    With target_epsilon, a step that would take epsilon past it is refused (PrivacyBudgetExceeded) unless
    allow_overspend=True. backend: "auto" = "flashdp" for a model on a CUDA device, "flashdp_eager" otherwise.
    dynamic_seq / fullgraph / mode go to dpcompile.compile; the other keywords are the backend's options.
    max_grad_norm="adaptive": adaptive clipping (privacy/adaptive.py, docs/privacy.md): every group's threshold
    follows the target_quantile (default 0.5) of its per-sample norms, estimated privately each step with noise
    quantile_noise_std (default expected batch / 20), updated geometrically at clip_learning_rate (default 0.2) from
    initial_max_grad_norm (default 1.0, split over the groups as C/sqrt(G)); noise_multiplier (or the one calibrated
    for target_epsilon) is what each step is charged: the gradient noise is raised so that the gradient and quantile
    releases together cost that.
    Privacy spent so far: `optimizer.get_epsilon(target_delta)`; `optimizer.accountant` holds the history.
    The loader tells the optimizer where each logical batch starts, so that a step over two of them is refused.

    Under an initialized torch.distributed group (torchrun; `process_group`, default WORLD) the same call trains
    data-parallel: the batch size is the *global* expected batch (a DataLoader with a DistributedSampler gives a
    per-rank batch_size, multiplied by the number of ranks), each rank gets a DistributedPoissonDataLoader share of
    every global Poisson batch, the optimizer is a DistributedDPOptimizer (clipped sums summed over ranks, noise
    once), and the accountant counts the global q. A model sharded with FSDP2 fully_shard (at its root only) gets
    its forward compiled in place, FSDP's hooks around it. See docs/distributed.md.
    """
    from .sampling import DPDataLoader

    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon or noise_multiplier")
    if target_epsilon is not None and (target_delta is None or epochs is None):
        raise ValueError("target_epsilon needs target_delta and epochs (sigma is calibrated for the whole run)")
    if target_delta is not None and not (0 < target_delta < 1):
        raise ValueError(f"target_delta={target_delta!r} must be in (0, 1)")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1")
    backend = resolve_backend(backend, model)
    group = _dist.active_process_group(process_group)
    if group is not None:
        _dist.refuse_unsupported_wrappers(model)
        if isinstance(data_loader, DPDataLoader):
            raise DPCompileError("make_private under torch.distributed shares out every global Poisson batch itself: "
                                 "pass the torch DataLoader (or a PoissonDataLoader), not a DPDataLoader")
        loader = _distributed_loader(data_loader, group, max_physical_batch_size, secure_mode, generator)
    else:
        loader = _poisson_loader(data_loader, max_physical_batch_size, secure_mode, generator)
    q = loader.sample_rate
    steps = epochs * len(loader) if epochs is not None else None
    compile_kwargs = {k: backend_options.pop(k) for k in ("dynamic_seq", "fullgraph", "mode")
                      if k in backend_options}
    adaptive = _adaptive_options(max_grad_norm, backend_options, group)
    options = dict(max_grad_norm=max_grad_norm, clipping=clipping, loss_reduction=loss_reduction,
                   **backend_options)
    randomized = predict_randomized_accounting(model, options)
    if randomized is not None and accountant != "pld":
        raise DPCompileError(f"make_private: strategy 'randomized' (probe-estimated norms) is accounted with "
                             f"accountant='pld' only, not {accountant!r}")
    calibration = None
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(target_epsilon, target_delta, q, steps, accountant=accountant,
                                                epsilon_tolerance=epsilon_tolerance, **(randomized or {}))
        if randomized is not None:
            calibration = dict(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                               accountant=accountant, spec=randomized)
    if adaptive is not None:  # refuse a noise_multiplier the quantile release leaves no room for, before compiling
        check_adaptive_noise(model, options, noise_multiplier, q * len(loader.dataset), adaptive)
    if target_delta is not None and target_delta > 1.0 / len(loader.dataset):
        import warnings

        warnings.warn(f"target_delta={target_delta} is larger than 1/N = {1 / len(loader.dataset):.2e}; "
                      "the usual choice is delta << 1/N", stacklevel=2)
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=q * len(loader.dataset), loss_reduction=loss_reduction,
                  generator=None if secure_mode else generator, secure_mode=secure_mode,
                  accountant=PrivacyAccountant(accountant), sample_rate=q)
    if group is None:
        compiled = dp_compile(model, backend=backend, **compile_kwargs, **options)
        dp_optimizer = DPOptimizer(optimizer, **common, adaptive_clipping=adaptive)
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
            compiled = dp_compile(model, backend=backend, **compile_kwargs, **options)
        # an FSDP2 root's units are set to sum (not average) here, before any backward
        dp_optimizer = _dist.DistributedDPOptimizer(optimizer, module=model, process_group=group, **common)
    dp_optimizer.target_delta = target_delta
    dp_optimizer.planned_steps = steps
    if target_epsilon is not None:
        dp_optimizer.plan(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                          allow_overspend=allow_overspend)
    dp_optimizer.allow_overspend = bool(allow_overspend)
    dp_optimizer._calibration = calibration
    if hasattr(loader, "attach_optimizer"):
        loader.attach_optimizer(dp_optimizer)
    return PrivateTraining(compiled, dp_optimizer, loader)


def _adaptive_options(max_grad_norm, backend_options: dict, group) -> Optional[dict]:
    """The adaptive clipping keywords (taken out of backend_options) when max_grad_norm == "adaptive", else None."""
    from .adaptive import ADAPTIVE_KEYS

    given = {k: backend_options.pop(k) for k in ADAPTIVE_KEYS if k in backend_options}
    if not (isinstance(max_grad_norm, str) and max_grad_norm == "adaptive"):
        if given:
            raise ValueError(f"make_private: {sorted(given)} are options of adaptive clipping; pass "
                             "max_grad_norm='adaptive' with them")
        return None
    if group is not None:
        raise DPCompileError("make_private: max_grad_norm='adaptive' is not supported under torch.distributed yet "
                             "(the quantile counts would have to be summed over ranks)")
    return given


def check_adaptive_noise(model: nn.Module, options: dict, noise_multiplier: float, expected_batch: float,
                         adaptive: dict) -> None:
    """Refuses (DPCompileError), before anything is compiled, a noise_multiplier that the quantile release of
    adaptive clipping leaves no room for (privacy/adaptive.gradient_noise_multiplier), from the model's groups."""
    from ..backend import _groups_of
    from ..options import DPOptions
    from .adaptive import gradient_noise_multiplier, make_adaptive

    opts = DPOptions.parse(options)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        return
    groups = len(set(_groups_of(names, dict(model.named_parameters()), opts).values()))
    gradient_noise_multiplier(noise_multiplier, make_adaptive(expected_batch, adaptive).quantile_noise_std, groups)


def predict_randomized_accounting(model: nn.Module, options: dict) -> Optional[dict]:
    """What the accountant will be told about randomized norms (see privacy.coverage.randomized_accounting), as
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
