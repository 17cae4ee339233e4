"""DP-SGD past one process: data parallelism (replicated parameters) and FSDP2 (`fully_shard`) with flashdp.

What every rank holds after its backward passes is the sum of per-sample clipped gradients of *its own* samples:
the per-sample norms come from this rank's samples only and are never reduced across ranks (the flashdp graph
sees the whole, unsharded parameter, also under FSDP2, whose all-gather runs before the compiled forward). One
logical step of `DistributedDPOptimizer` then makes the single-process step out of the ranks' parts:

    replicated parameter:  g = (sum_r clipped_r + N(0, sigma^2 C^2)) / expected_batch_size
        rank 0 of the group draws the noise (from the generator, or the secure per-step generator, exactly as
        DPOptimizer does) and adds it to its own part; one all-reduce (SUM) gives every rank the same g
    FSDP2-sharded parameter: FSDP's reduce-scatter sums (not averages: the divide factor is set to 1) the
        ranks' clipped sums into shards; each rank adds N(0, sigma^2 C^2) to the shard it owns, from a generator
        of its own, so every coordinate gets exactly one noise draw and no two shards share one

Sampling (`DistributedPoissonDataLoader`): every rank draws the same global Poisson batch (q over all N examples;
a generator state shared from rank 0, or in secure mode indices drawn from os.urandom on rank 0 and broadcast)
and keeps every world_size-th sampled index. The union over ranks is exactly one Poisson batch of the whole
dataset, so the accountant's q is the global one and the expected batch size is the global q * N. Every rank
yields the same number of micro-batches (some of 0 rows), because FSDP2's forward and backward are collective.

`make_private` picks all of this when torch.distributed is initialized (torchrun); see docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CoverageError, DPCompileError
from ..clip_provenance import grad_problem, last_arrival_problem, last_arrival_runs, randomized_runs
from .samplers import micro_batch_sizes
from .optimizer import (DPOptimizer, _uncovered_message, is_privatized, randomized_accounting,
                        sensitivity_problem)
from .sampling import PoissonDataLoader

__all__ = ["DistributedDPOptimizer", "DistributedPoissonDataLoader", "shard_logical_batch", "compile_forward",
           "active_process_group", "refuse_unsupported_wrappers", "prepare_fsdp", "is_fsdp2_module"]

# --------------------------------------------------------------------------------------------------- helpers
def active_process_group(process_group=None):
    """The group to sum over: `process_group`, else WORLD when torch.distributed is initialized, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise DPCompileError("process_group was given but torch.distributed is not initialized "
                                 "(call torch.distributed.init_process_group first, e.g. under torchrun)")
        return None
    return process_group if process_group is not None else dist.group.WORLD


def _require_group(process_group, who: str):
    group = active_process_group(process_group)
    if group is None:
        raise DPCompileError(f"{who} needs an initialized torch.distributed process group (launch with torchrun, "
                             "or call torch.distributed.init_process_group); in one process use the plain class")
    return group


def _comm_device(group) -> torch.device:
    """Where small control tensors must live for this group's backend (NCCL only moves CUDA tensors)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_src(group) -> int:
    """Global rank of the group's rank 0 (broadcast sources are global ranks)."""
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return ()
    return DTensor


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without FSDP2)
        return ()
    return FSDPModule


def is_fsdp2_module(module: Any) -> bool:
    fsdp = _fsdp_module_type()
    return bool(fsdp) and isinstance(module, fsdp)


def refuse_unsupported_wrappers(model: Any) -> None:
    """torch DDP and FSDP1 wrappers are refused: see docs/distributed.md ("Not supported")."""
    from torch.nn.parallel import DistributedDataParallel

    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    if any(isinstance(m, DistributedDataParallel) for m in modules):
        raise DPCompileError(
            "the model is wrapped in torch.nn.parallel.DistributedDataParallel: pass the bare module instead. "
            "dpcompile sums the ranks' clipped gradients itself, once per logical step, in "
            "DistributedDPOptimizer.step(); DDP would all-reduce (average) them at every backward, and Dynamo's "
            "DDPOptimizer (torch._dynamo.config.optimize_ddp) splits the compiled graph at DDP's bucket "
            "boundaries, across clipping groups")
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()
    if FullyShardedDataParallel and any(isinstance(m, FullyShardedDataParallel) for m in modules):
        raise DPCompileError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters hide the per-parameter "
            "gradients the clipping groups are made of; shard it with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead")


def _derived_seed(base: int, rank: int, purpose: str) -> int:
    """A 63-bit seed for `purpose` on `rank`, distinct across ranks even when `base` is the same on every rank."""
    digest = hashlib.sha256(f"dpcompile:{purpose}:{base}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -------------------------------------------------------------------------------------------------- sampling
def shard_logical_batch(indices: torch.Tensor, rank: int, world_size: int,
                        max_physical_batch_size: Optional[int]) -> List[torch.Tensor]:
    """This rank's micro-batches (index tensors) of one global logical batch.

    The rank keeps indices[rank::world_size] (shares differ in size by at most one), split into chunks of at most
    `max_physical_batch_size`. Every rank returns the same number of chunks, ceil(ceil(S / W) / max), at least
    one; the ones past its share have 0 rows. The same count matters because FSDP2's forward and backward are
    collectives that every rank must enter; an empty micro-batch costs a 0-row pass and adds an exact zero.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    mine = indices[rank::world_size]
    per_rank = -(-indices.numel() // world_size)
    size = max_physical_batch_size or max(per_rank, 1)
    n_micro = max(1, -(-per_rank // size))
    chunks = list(torch.split(mine, micro_batch_sizes(mine.numel(), size))) if mine.numel() else []
    chunks += [mine[:0]] * (n_micro - len(chunks))
    return chunks


class DistributedPoissonDataLoader(PoissonDataLoader):
    """PoissonDataLoader for one rank of a data-parallel group: each iteration yields this rank's micro-batches of
    one *global* Poisson logical batch (see the module docstring).

    Every rank must hold the same dataset (indexed 0..N-1 alike) and iterate the loader in lockstep. Arguments are
    PoissonDataLoader's, with `sample_rate` / `expected_batch_size` global (q over all N examples, q * N in
    total over the ranks); `process_group` defaults to WORLD.

    Not secure: the generator (given, or OS-seeded) of the group's rank 0 is copied to every rank at
    construction, so all ranks draw the same global batch with no communication per step, and a run with the
    same generator samples exactly the logical batches a single process would. secure_mode: rank 0 draws the
    inclusion decisions from os.urandom (as PoissonDataLoader does) and broadcasts the sampled indices each step.
    """

    def __init__(self, dataset: Any, sample_rate: Optional[float] = None, *, process_group=None, **kwargs) -> None:
        group = _require_group(process_group, "DistributedPoissonDataLoader")
        super().__init__(dataset, sample_rate, **kwargs)
        self.process_group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._device = _comm_device(group)
        self._src = _group_src(group)
        n = len(self.dataset)
        lengths = torch.tensor([n, -n], dtype=torch.int64, device=self._device)
        dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=group)
        if lengths[0].item() != -lengths[1].item():
            raise DPCompileError(
                f"DistributedPoissonDataLoader: the ranks' datasets differ in length ({-lengths[1].item()} to "
                f"{lengths[0].item()}); every rank must hold the whole dataset, indexed alike, because the sample "
                "is drawn over all N examples and then shared out")
        if not self.secure_mode:
            state = self.generator.get_state().to(self._device)
            dist.broadcast(state, src=self._src, group=group)
            self.generator.set_state(state.cpu())

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank}, world_size={self.world_size})"

    def sample_indices(self) -> torch.Tensor:
        """The global logical batch (the same on every rank; a collective in secure mode)."""
        if not self.secure_mode:
            return super().sample_indices()
        if self.rank == 0:
            idx = super().sample_indices()
            count = torch.tensor([idx.numel()], dtype=torch.int64, device=self._device)
        else:
            count = torch.zeros(1, dtype=torch.int64, device=self._device)
        dist.broadcast(count, src=self._src, group=self.process_group)
        buf = idx.to(self._device) if self.rank == 0 else torch.empty(int(count.item()), dtype=torch.int64,
                                                                         device=self._device)
        if buf.numel():
            dist.broadcast(buf, src=self._src, group=self.process_group)
        return buf.cpu()

    def __iter__(self) -> Iterator[List[Any]]:
        for _ in range(self.steps):
            chunks = shard_logical_batch(self.sample_indices(), self.rank, self.world_size,
                                         self.max_physical_batch_size)
            yield [self._collate(c) if c.numel() else self._empty() for c in chunks]


# ----------------------------------------------------------------------------------------------------- FSDP2
def prepare_fsdp(module: nn.Module) -> list:
    """Make every FSDP2 unit under `module` reduce-scatter the *sum* of the ranks' gradients (FSDP averages by
    default); returns the units. The noise is calibrated to the sum of clipped per-sample gradients."""
    fsdp = _fsdp_module_type()
    units = [m for m in module.modules() if fsdp and isinstance(m, fsdp)]
    for unit in units:
        setter = getattr(unit, "set_gradient_divide_factor", None) or getattr(
            unit, "set_reduce_scatter_divide_factor", None)
        if setter is None:
            raise DPCompileError("this torch's FSDP2 has no set_gradient_divide_factor: FSDP would average the "
                                 "clipped sums over ranks; dpcompile needs torch >= 2.6 for FSDP2")
        setter(1.0)
        force_sum = getattr(unit, "set_force_sum_reduction_for_comms", None)
        if force_sum is not None:  # a plain SUM collective (gloo has no PREMUL_SUM) and no division by 1.0
            force_sum(True)
    return units


class _UnshardedParams:
    """Which unsharded parameter FSDP2 gave each sharded one during the last forward.

    FSDP2 keeps the sharded DTensor in the optimizer and, in each unit's forward pre-hook, puts a full plain
    parameter in its place; the flashdp graph sees (and privatizes) that one. A pre-hook registered after FSDP's
    (which FSDP prepends) reads it back, so that the coverage and sensitivity checks can look at the tensors the
    graphs actually clipped.
    """

    def __init__(self, module: nn.Module, sharded: list, units: list):
        fsdp = _fsdp_module_type()
        wanted = {id(p): p for p in sharded}
        self.slots: dict = {}  # id(unit) -> [(owner module, attribute name, sharded parameter)]
        found = set()
        for unit in units:
            slots, stack = [], [unit]
            while stack:
                m = stack.pop()
                for name, p in m._parameters.items():
                    if p is not None and id(p) in wanted:
                        slots.append((m, name, p))
                        found.add(id(p))
                stack.extend(c for c in m.children() if not isinstance(c, fsdp))
            self.slots[id(unit)] = slots
            unit.register_forward_pre_hook(self._capture)
        missing = [tuple(p.shape) for p in sharded if id(p) not in found]
        if missing:
            raise DPCompileError(f"DistributedDPOptimizer: DTensor parameters of shapes {missing[:4]} are not "
                                 "managed by an FSDP2 unit (fully_shard) of `module`; tensor-parallel (DTensor) "
                                 "parameters without FSDP2 are not supported")
        self._unsharded: dict = {}  # id(sharded) -> weakref to its unsharded parameter

    def _capture(self, unit, args) -> None:
        for m, name, sharded in self.slots.get(id(unit), ()):
            cur = m._parameters.get(name)
            if cur is not None and cur is not sharded:
                self._unsharded[id(sharded)] = weakref.ref(cur)

    def unsharded(self, sharded) -> Optional[torch.Tensor]:
        ref = self._unsharded.get(id(sharded))
        return ref() if ref is not None else None


def compile_forward(module: nn.Module, *, backend: str = "flashdp", **options) -> nn.Module:
    """Compile `module.forward` in place with the flashdp backend and return `module`; call the module as usual.

    Unlike dpcompile.compile(module), which compiles the whole call, the module's hooks stay outside the graph:
    for an FSDP2 unit (fully_shard) they are the all-gather before the forward and the reduce-scatter after the
    backward, and the graph sees the full, unsharded parameters. Every trainable parameter reachable from the
    module's forward must be in this one graph (a nested fully_shard unit inside it is a graph break, which
    fullgraph refuses).
    """
    from ..compile import DPCompiled
    from ..options import DPOptions

    if isinstance(module.__dict__.get("forward"), DPCompiled):
        raise DPCompileError("compile_forward: this module's forward is already compiled")
    opts = DPOptions.parse(options)
    compiled = torch.compile(module.forward, backend=backend, options=opts.as_dict(), fullgraph=True)
    module.forward = DPCompiled(module, compiled, opts)  # an instance attribute: nn.Module.__call__ runs it
    return module


def _check_sharding(p, name: str, group) -> None:
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        raise DPCompileError(
            f"DistributedDPOptimizer: parameter {name} is a DTensor on a {mesh.ndim}-D mesh with placements "
            f"{placements}; only FSDP2 over a 1-D data-parallel mesh (Shard placement) is supported. HSDP replicates "
            "each shard over ranks that would all noise it, and tensor parallelism needs the per-sample norms of "
            "one sample's gradient summed over its shards inside the graph, which the flashdp pass does not do")
    mesh_ranks = sorted(dist.get_process_group_ranks(mesh.get_group(0)))
    group_ranks = sorted(dist.get_process_group_ranks(group))
    if mesh_ranks != group_ranks:
        raise DPCompileError(
            f"DistributedDPOptimizer: parameter {name} is sharded over ranks {mesh_ranks}, but the optimizer sums "
            f"over process_group ranks {group_ranks}; pass the FSDP2 mesh's group as process_group")


# ------------------------------------------------------------------------------------------------- optimizer
class DistributedDPOptimizer(DPOptimizer):
    """DPOptimizer for a data-parallel group (see the module docstring for what one step computes).

    Arguments are DPOptimizer's, with `expected_batch_size` and `sample_rate` *global* (q * N over all ranks), and:
      module: the model (required when parameters are FSDP2-sharded DTensors: its fully_shard units are set to
          sum, not average, and their unsharded parameters are tracked for the coverage check). Refused if it
          contains torch DDP or FSDP1.
      process_group: the data-parallel group (default WORLD). Every rank of it must call step() together.
      broadcast_parameters: copy rank 0's replicated (non-sharded) parameters and buffers to every rank now, so
          that replicas that get the same noisy gradient stay equal.
      bucket_cap_mb: size of the fp32 buckets that the replicated gradients are all-reduced in.
      check_sensitivity: refuse to step when the thresholds of the graphs that clipped the gradients bound the
          per-sample gradient by more than max_grad_norm (several graphs each clipping to C, as when FSDP2 units
          are compiled one by one with the same max_grad_norm: give each of K graphs C / sqrt(K)).
    generator: rank 0's generator draws the replicated parameters' noise (as in one process); sharded parameters'
    noise comes from a generator seeded from (generator's initial seed, rank), or from os.urandom without one,
    never from the global torch RNG (ranks often seed it alike, and equal noise on two shards cancels out of
    their difference). secure_mode: every rank draws from a fresh OS-seeded generator every step.
    """

    _sums_across_ranks = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm,
                 expected_batch_size: float, loss_reduction: str = "mean", generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, accountant=None, sample_rate: Optional[float] = None,
                 check_coverage: bool = True, module: Optional[nn.Module] = None, process_group=None,
                 broadcast_parameters: bool = True, bucket_cap_mb: float = 25.0, check_sensitivity: bool = True):
        group = _require_group(process_group, "DistributedDPOptimizer")
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=generator,
                         secure_mode=secure_mode, accountant=accountant, sample_rate=sample_rate,
                         check_coverage=check_coverage, check_sensitivity=check_sensitivity)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} must be positive")
        self.process_group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_cap_mb = float(bucket_cap_mb)
        self._device = _comm_device(group)
        self._src = _group_src(group)
        if module is not None:
            refuse_unsupported_wrappers(module)
        DTensor = _dtensor_type()
        names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        params = list(self._params())
        sharded = [p for p in params if DTensor and isinstance(p, DTensor)]
        for p in sharded:
            _check_sharding(p, names.get(id(p), f"of shape {tuple(p.shape)}"), group)
        self._unsharded: Optional[_UnshardedParams] = None
        if sharded:
            if module is None:
                raise DPCompileError("DistributedDPOptimizer: the parameters are FSDP2-sharded DTensors; pass "
                                     "module=<the fully_shard model> so that its units sum (not average) the ranks' "
                                     "gradients and the clipped parameters can be checked")
            units = prepare_fsdp(module)
            self._unsharded = _UnshardedParams(module, sharded, units)
        self._shard_generators: dict = {}
        base = generator.initial_seed() if generator is not None else int.from_bytes(os.urandom(8), "little")
        self._shard_seed = _derived_seed(base, self.rank, "shard-noise")
        if broadcast_parameters:
            self._broadcast_replicas(module, params)

    # -- setup -----------------------------------------------------------------------------------------------
    def _broadcast_replicas(self, module: Optional[nn.Module], params: list) -> None:
        DTensor = _dtensor_type()
        tensors = [p for p in params if not (DTensor and isinstance(p, DTensor))]
        if module is not None:
            seen = {id(t) for t in tensors}
            tensors += [b for b in module.buffers() if id(b) not in seen and not (DTensor and isinstance(b, DTensor))]
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=self._src, group=self.process_group)

    def _shard_generator(self, device: torch.device) -> torch.Generator:
        if self.secure_mode:
            return self._step_generator(device)
        gen = self._shard_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._shard_seed)
            self._shard_generators[device] = gen
        return gen

    # -- checks --------------------------------------------------------------------------------------------------
    def _local_problem(self, replicated: list, sharded: list) -> Optional[DPCompileError]:
        """Why this rank cannot step, or None. Computed on every rank and agreed on before any noise is added,
        so that one rank's refusal cannot leave the others waiting in a collective."""
        clipped = []
        for p in replicated:
            if p.grad is None:
                continue
            why = grad_problem(p)
            if self.check_coverage and why is not None:
                return CoverageError(_uncovered_message(p, why, self._name_of(p)))
            clipped.append(p)
        for p in sharded:
            if p.grad is None:
                continue
            u = self._unsharded.unsharded(p) if self._unsharded is not None else None
            why = last_arrival_problem(u) if u is not None else "FSDP gave it no unsharded parameter in a forward"
            if self.check_coverage and why is not None:
                return CoverageError(
                    f"an FSDP2-sharded parameter of shape {tuple(p.shape)} has a gradient, but the unsharded "
                    f"parameter FSDP used in the last forward did not get a clipped one: {why}. Compile the "
                    "forward that uses it with dpcompile (dpcompile.privacy.distributed.compile_forward for a "
                    "fully_shard unit)")
            if u is not None:
                clipped.append(u)
        if self.check_sensitivity and clipped:
            return sensitivity_problem(clipped, self.max_grad_norm_total, type(self).__name__)
        return None

    def _accounted_params(self) -> list:
        DTensor = _dtensor_type()
        out = []
        for p in self._params():
            if DTensor and isinstance(p, DTensor):
                u = self._unsharded.unsharded(p) if self._unsharded is not None else None
                if u is not None and is_privatized(u):
                    out.append(u)
            elif is_privatized(p):
                out.append(p)
        return out

    def _step_runs(self) -> frozenset:
        """This rank's probe counts behind the gradients it noises; for an FSDP2 shard, those of the last gradient
        that arrived at its unsharded parameter (FSDP consumes and frees that gradient)."""
        DTensor = _dtensor_type()
        runs = set()
        for p in self._params():
            if p.grad is None:
                continue
            if DTensor and isinstance(p, DTensor):
                u = self._unsharded.unsharded(p) if self._unsharded is not None else None
                runs |= last_arrival_runs(u) if u is not None else frozenset()
            else:
                runs |= randomized_runs([p])
        return frozenset(runs)

    def _local_accounting(self):
        """(this rank's randomized-norm description or None, the probe counts behind its gradients, a problem)."""
        runs = self._step_runs()
        try:
            return randomized_accounting(self._accounted_params(), self.max_grad_norm_total), runs, None
        except DPCompileError as e:
            return None, runs, e

    def _agree_accounting(self, spec: Optional[dict], runs: frozenset, any_spec: bool, any_ran: bool) -> dict:
        """Every rank accounts the same step: a sample on any rank may have been clipped by an estimate (a rank
        that has only seen micro-batches of one or none may not have compiled the graph that says so yet), and the
        accountant is told the probe counts behind every rank's gradients."""
        self._pending_runs = runs
        if any_spec:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (spec, sorted(runs)), group=self.process_group)
            specs = [s for s, _ in gathered]
            self._pending_runs = frozenset(k for _, ks in gathered for k in ks)
            known = [s for s in specs if s is not None]
            first = known[0]
            from .optimizer import _same_spec

            if any(not _same_spec(first, s) or s["variant"] != first["variant"] for s in known[1:]):
                raise DPCompileError(f"DistributedDPOptimizer: the ranks' compiled graphs describe different randomized "
                                     f"norms ({known}); compile the same model with the same options on every rank")
            spec = first
        return self._check_accounting(spec if any_spec else None, ran=any_ran)

    def _agree(self, problem: Optional[Exception], replicated: list, sharded: list,
               randomized: tuple = (False, False)) -> tuple:
        """One small all-reduce: every rank learns whether some rank refused, that all ranks hold the same
        parameters, and whether the replicated gradients were already identical on every rank (then they were
        synchronized before this optimizer, e.g. by torch DDP, or the ranks clipped the same samples: summing
        them again would count every sample world_size times). randomized: (this rank's graphs describe randomized
        norms, randomized norms ran on this rank); returns the same two facts over all ranks."""
        n_rep = sum(p.numel() for p in replicated)
        n_shard = sum(p.numel() for p in sharded)
        sums: dict = {}  # device -> (sum, sum of squares) in float64, read back once per device
        with torch.no_grad():
            for p in replicated:
                if p.grad is not None:
                    g = p.grad.detach().double()
                    s, q = sums.get(g.device, (0.0, 0.0))
                    sums[g.device] = (s + g.sum(), q + g.square().sum())
        fp_sum = sum(float(s) for s, _ in sums.values())
        fp_sq = sum(float(q) for _, q in sums.values())
        vals = [float(problem is not None), float(len(replicated)), float(n_rep), float(len(sharded)),
                float(n_shard), fp_sum, fp_sq, float(randomized[0]), float(randomized[1])]
        t = torch.tensor(vals + [-v for v in vals], dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        k = len(vals)
        hi, lo = t[:k].tolist(), [-v for v in t[k:].tolist()]
        if hi[0] > 0:
            if problem is not None:
                raise problem
            raise DPCompileError("DistributedDPOptimizer: another rank refused this step (its error names the "
                                 "cause); no noise was added and nothing was stepped")
        if hi[1:5] != lo[1:5]:
            raise DPCompileError(
                "DistributedDPOptimizer: the ranks' optimizers hold different parameters (counts "
                f"{lo[1]:.0f}..{hi[1]:.0f} replicated, {lo[3]:.0f}..{hi[3]:.0f} sharded); every rank must wrap "
                "the same model's parameters in the same order")
        if self.world_size > 1 and hi[6] > 0 and hi[5] == lo[5] and hi[6] == lo[6]:
            raise DPCompileError(
                "DistributedDPOptimizer: the clipped gradients are identical on every rank before the sum over "
                "ranks. Either something already all-reduced them (torch DistributedDataParallel: pass the bare "
                "module, dpcompile sums the ranks itself) or every rank clipped the same samples (shard the data: "
                "DistributedPoissonDataLoader / make_private); summing them would count each sample "
                f"{self.world_size} times")
        return hi[7] > 0, hi[8] > 0

    # -- noise -----------------------------------------------------------------------------------------------
    def add_noise(self) -> None:
        """Sum the ranks' clipped sums, add the noise once, scale (collective: every rank calls it together)."""
        DTensor = _dtensor_type()
        params = list(self._params())
        sharded = [p for p in params if DTensor and isinstance(p, DTensor)]
        replicated = [p for p in params if not (DTensor and isinstance(p, DTensor))]
        problem = self._local_problem(replicated, sharded)
        spec, runs, accounting_problem = self._local_accounting()
        any_spec, any_ran = self._agree(problem or accounting_problem, replicated, sharded,
                                        (spec is not None, bool(runs)))
        self._pending_accounting = self._agree_accounting(spec, runs, any_spec, any_ran)
        std = self.noise_multiplier * self.max_grad_norm_total
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        with torch.no_grad():
            self._reduce_replicated(replicated, std, scale)
            self._noise_shards(sharded, std, scale)

    def _buckets(self, params: list) -> Iterator[list]:
        cap = max(1, int(self.bucket_cap_mb * 2 ** 20 / 4))  # fp32 elements
        bucket, size, device = [], 0, None
        for p in params:
            if bucket and (p.device != device or size + p.numel() > cap):
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
            device = p.device
        if bucket:
            yield bucket

    def _reduce_replicated(self, params: list, std: float, scale: float) -> None:
        gens: dict = {}
        for bucket in self._buckets(params):
            parts = []
            for p in bucket:
                g = p.grad.detach().float() if p.grad is not None else torch.zeros(p.shape, device=p.device)
                if self.rank == 0:  # the one noise draw of the step (parameter by parameter; DPOptimizer draws
                    # one vector per device: the same distribution, another stream of the generator)
                    if self.secure_mode and p.device not in gens:
                        gens[p.device] = self._step_generator(p.device)
                    gen = gens[p.device] if self.secure_mode else self.generator
                    g = g + self._noise(p.shape, p.device, std, gen)
                parts.append(g.flatten())
            flat = torch.cat(parts)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = (flat[offset:offset + n].view(p.shape) * scale).to(p.dtype)
                offset += n

    def _noise_shards(self, params: list, std: float, scale: float) -> None:
        from torch.distributed.tensor import DTensor

        gens: dict = {}
        for p in params:
            local_shape = p.to_local().shape
            device = p.to_local().device
            local = p.grad.to_local().float() if p.grad is not None else torch.zeros(local_shape, device=device)
            if device not in gens:
                gens[device] = self._shard_generator(device)
            gen = gens[device]
            noisy = ((local + self._noise(local_shape, device, std, gen)) * scale).to(p.dtype)
            p.grad = DTensor.from_local(noisy, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shard_seed"] = self._shard_seed
        state["shard_generators"] = {str(d): g.get_state() for d, g in self._shard_generators.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "shard_seed" in state:
            self._shard_seed = state["shard_seed"]
            self._shard_generators = {}
            for d, s in state.get("shard_generators", {}).items():
                gen = torch.Generator(device=torch.device(d))
                gen.set_state(s)
                self._shard_generators[torch.device(d)] = gen

    def __repr__(self) -> str:
        return super().__repr__().replace("DPOptimizer(", f"DistributedDPOptimizer(rank {self.rank}/"
                                          f"{self.world_size}, ", 1)
