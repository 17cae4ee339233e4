"""Which gradients were clipped, and by which graph: facts recorded at run time by the call that produced them.

This is the one contract between the compiled graphs (backend.py writes it) and the privacy layer (DPOptimizer
reads it). A compile-time list of parameter ids is not enough: Dynamo reuses a compiled graph for a second
instance of a model class, a deep copy or a reloaded model without compiling again, and a parameter that some
graph clipped once can later get an unclipped gradient from eager code or from another backend.

How it is recorded. Every call of a flashdp graph that can build an autograd graph routes its trainable
parameters through one identity autograd Function (`_ClipTap`). Its backward sees exactly the gradients the
clipping graph produced and leaves them as *pending* on each parameter. A tensor pre-hook on the parameter then
sees the whole gradient that arrives at it in that backward: if it is the very tensor the tap delivered, the
arrival is clipped; anything else (an eager use of the parameter, a second graph call in the same backward, a
graph of another backend, no graph at all) was summed into it, and the arrival is marked foreign with the reason.
A post-accumulate hook binds the verdict to the `.grad` tensor it describes, so a `.grad` set or replaced by hand
is not vouched for either.

Randomized norms travel the same way. A graph call whose backward estimated per-sample norms with probes
(docs/randomized.md) hands its effective probe count (GraphClipping.runs) to the tap with its gradients, and the
count is bound to the `.grad` those gradients were accumulated into: `randomized_runs(params)` is the set of counts
behind the gradients an optimizer is about to noise (DPOptimizer reads it and tells its accountant), with no
process-wide record to take or to reset.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import DPCompileError
from .randomized_contract import accounting_probes


@dataclass(eq=False)
class GraphClipping:
    """One compiled graph's clipping, built once per compiled graph (hashable by identity).

    sensitivity: sqrt(sum_g C_g^2) over the groups the graph clips (one sample's bound in one call).
    names: parameter name of each trainable graph input, in the order the tap receives them.
    randomized_positions: indices into `names` whose per-sample norm the graph estimates with probes.
    randomized_groups: clipping group -> C_g of every group holding a randomized site.
    classified: the pass looked at samples (B >= 1): its randomized verdicts are comparable with other graphs'.
    runs: the effective probe counts (randomized_contract.accounting_probes) one backward of the graph estimates
        norms with: {k} when the graph holds randomized sites (a fresh probe seed every call),
        else empty. Each call's tap hands it, with the clipped gradients, to the parameters' records.
    """

    sensitivity: float
    names: tuple
    randomized_positions: frozenset = frozenset()
    randomized_groups: dict = field(default_factory=dict)
    classified: bool = False
    probes: Optional[int] = None
    variant: Optional[str] = None
    options_key: Optional[str] = None
    #: max_grad_norm="adaptive": the groups of the graph's run-time thresholds, in the order of its thresholds
    #: input (empty for compile-time thresholds). Such a graph's sensitivity is inf here: each call's thresholds
    #: are the ones its parameters' RuntimeThresholds held at that call (`threshold_input`)
    runtime_groups: tuple = ()

    @property
    def runs(self) -> frozenset:
        if not self.randomized_positions:
            return frozenset()
        return frozenset({accounting_probes(self.probes, self.variant or "hutchinson")})

    @classmethod
    def from_context(cls, ctx) -> "GraphClipping":
        positions = {idx: k for k, idx in enumerate(ctx.params)}
        sensitivity = (math.inf if ctx.runtime_thresholds
                       else math.sqrt(sum(float(c) ** 2 for c in ctx.thresholds.values())))
        return cls(sensitivity,
                   tuple(info.name for info in ctx.params.values()),
                   frozenset(positions[i] for i in ctx.randomized),
                   ctx.randomized_groups() if ctx.randomized else {},
                   ctx.classified, ctx.options.probes, ctx.options.probe_variant, ctx.options.cache_key(),
                   tuple(ctx.threshold_groups))


class GradProvenance:
    """What is known about one tensor's gradients.

    graphs: every graph that delivered a clipped gradient to it -> whether that graph estimated its norm
        (kept for the tensor's life: the sensitivity and the accounting cover every graph a sample may go through).
    grad: weak reference to the `.grad` tensor the last arrival was accumulated into.
    foreign: why that `.grad` holds a term no clipping graph produced (None: every term was clipped).
    runs: the effective probe counts of the randomized graph calls whose clipped gradients were accumulated into
        that `.grad` (GraphClipping.runs; empty: exact norms only). Started afresh by an arrival into a `.grad` of
        None, added to by the arrivals after it; for a tensor whose gradient others consume (FSDP2's unsharded
        parameters), the last arrival's.
    """

    __slots__ = ("name", "graphs", "pending", "pending_runs", "replayed", "grad", "foreign", "arrivals", "runs",
                 "_before", "_arrival", "_arrival_runs", "__weakref__")

    def __init__(self, name: str):
        self.name = name  # the parameter name the first graph that clipped it gave it (for messages)
        self.graphs: dict = {}
        self.pending: list = []  # the clipped gradients the taps delivered in the running backward
        self.pending_runs: set = set()  # the randomized probe counts of the taps that delivered them
        self.replayed = False  # a tap's backward ran a second time (retain_graph) in the running backward
        self.grad = None
        self.foreign: Optional[str] = None
        self.arrivals = 0  # backward passes that accumulated into `grad` (one per compiled call backpropagated)
        self.runs: frozenset = frozenset()
        self._before = None
        self._arrival: Optional[str] = None  # the verdict of the arrival between the two hooks
        self._arrival_runs: frozenset = frozenset()  # its randomized probe counts, between the two hooks

    def current_grad_problem(self, p: torch.Tensor) -> Optional[str]:
        """Why `p.grad` is not known to be made only of clipped terms, or None."""
        if p.grad is None:
            return None
        if self.grad is None or self.grad() is not p.grad:
            return "its .grad was set outside a flashdp graph's backward (by hand, or by code dpcompile cannot see)"
        return self.foreign


class _ByIdentity:
    """A map keyed by tensor identity that does not keep its keys alive: a dict by id() whose entries carry a weak
    reference to their key, checked at every lookup (an id reused by a later tensor is not a hit). torch's
    WeakIdKeyDictionary builds a weak-reference key object for every lookup; the ~1,300 lookups of a gpt2-small DP
    step took ~10 ms of its host time under the profiler (benchmarks/NOTES.md, entry 16)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict = {}  # id(tensor) -> (weakref to it, value)

    def get(self, key: torch.Tensor, default=None):
        hit = self._entries.get(id(key))
        return hit[1] if hit is not None and hit[0]() is key else default

    def __setitem__(self, key: torch.Tensor, value) -> None:
        entries, k = self._entries, id(key)

        def _forget(ref, entries=entries, k=k):  # the key died: drop its entry (unless a new one took the id)
            hit = entries.get(k)
            if hit is not None and hit[0] is ref:
                del entries[k]

        self._entries[k] = (weakref.ref(key, _forget), value)

    def __delitem__(self, key: torch.Tensor) -> None:
        if self.get(key, _ByIdentity) is _ByIdentity:
            raise KeyError("tensor not in the map")
        del self._entries[id(key)]

    def __len__(self) -> int:
        return sum(1 for ref, _ in self._entries.values() if ref() is not None)


_PROVENANCE = _ByIdentity()
#: bumped whenever a tensor's record gains a graph: what is derived from the records' graphs alone (coverage.py's
#: graph sets, read at every optimizer step) stays valid while it does not move
_GRAPHS_EPOCH = [0]


def graphs_epoch() -> int:
    return _GRAPHS_EPOCH[0]


def provenance(p: torch.Tensor) -> Optional[GradProvenance]:
    return _PROVENANCE.get(p)


def clipped_by_some_graph(p: torch.Tensor) -> bool:
    return record_clipped(_PROVENANCE.get(p))


def record_clipped(prov: Optional[GradProvenance]) -> bool:
    """Some graph delivered a clipped gradient to the tensor whose record (provenance()) this is."""
    return prov is not None and bool(prov.graphs)


def grad_problem(p: torch.Tensor) -> Optional[str]:
    """Why `p.grad` cannot be noised as a clipped sum (None when it can, or when there is no gradient)."""
    return grad_status(p)[0]


def grad_status(p: torch.Tensor) -> tuple:
    """(grad_problem(p), whether some graph clipped p) from one lookup of p's record (the optimizer asks both of
    every parameter at every step)."""
    return grad_status_of(p, _PROVENANCE.get(p))


def grad_status_of(p: torch.Tensor, prov: Optional[GradProvenance]) -> tuple:
    """grad_status(p) with p's record (provenance(p)) already looked up."""
    privatized = record_clipped(prov)
    if p.grad is None:
        return None, privatized
    if not privatized:
        return "no flashdp graph produced it (its gradient was not clipped)", False
    return prov.current_grad_problem(p), True


def clipped_arrivals(p: torch.Tensor) -> int:
    """How many backward passes accumulated into `p.grad` (0 when its .grad is not the one recorded)."""
    prov = _PROVENANCE.get(p)
    if prov is None or p.grad is None or prov.grad is None or prov.grad() is not p.grad:
        return 0
    return prov.arrivals


def randomized_runs(params, provs: Optional[list] = None) -> frozenset:
    """The effective probe counts of the randomized norms behind the gradients of `params` (tensors whose .grad is
    None contribute nothing): what an accountant must be told for a step that noises them
    (PrivacyAccountant.step(..., probes_ran=...)). Empty when every term was clipped with exact norms. A `.grad`
    set by hand keeps the counts of the arrivals before it (an over-report only makes the accounting looser).
    provs: the records of `params` (provenance(p) of each), when the caller has them."""
    runs: set = set()
    for p, prov in zip(params, provs) if provs is not None else ((p, _PROVENANCE.get(p)) for p in params):
        if prov is not None and p.grad is not None:
            runs |= prov.runs
    return frozenset(runs)


def last_arrival_runs(p: torch.Tensor) -> frozenset:
    """For a tensor whose gradient others consume and free (FSDP2's unsharded parameters): the effective probe
    counts of the randomized norms behind the last gradient that arrived at it."""
    prov = _PROVENANCE.get(p)
    return prov.runs if prov is not None else frozenset()


def last_arrival_problem(p: torch.Tensor) -> Optional[str]:
    """For a tensor whose gradient others consume and free (FSDP2's unsharded parameters): why the last gradient
    that arrived at it was not a clipped one, or None."""
    prov = _PROVENANCE.get(p)
    if prov is None or not prov.graphs:
        return "no flashdp graph produced it (its gradient was not clipped)"
    return prov.foreign


def _arrived(pref: "weakref.ref", prov: GradProvenance, grad: torch.Tensor) -> None:
    """Tensor pre-hook: `grad` is everything that reached the parameter in this backward."""
    p = pref()
    if p is None:
        return
    pending, prov.pending = prov.pending, []
    runs, prov.pending_runs = prov.pending_runs, set()
    prov._arrival_runs = frozenset(runs)
    replayed, prov.replayed = prov.replayed, False
    if replayed:
        prov._arrival = ("the same compiled call was backpropagated more than once (retain_graph=True), so its "
                         "samples' clipped gradients were counted more than once; run the forward again instead")
    elif len(pending) == 1 and grad is pending[0]:
        prov._arrival = None
    elif not pending:
        prov._arrival = ("a gradient that no flashdp graph produced was accumulated into it (an eager use of the "
                         "parameter outside the compiled call, or a graph of another backend)")
    elif len(pending) > 1:
        prov._arrival = (f"{len(pending)} calls of flashdp graphs fed it in one backward (a graph break, a block "
                         "compiled on its own and called twice, or several compiled calls summed into one loss), so "
                         "one sample may have been clipped in pieces; call backward() once per compiled call, or "
                         "compile the whole model into one graph (fullgraph=True)")
    else:
        prov._arrival = ("a gradient that no flashdp graph produced was added to its clipped gradient in the same "
                         "backward (the parameter is also used outside the compiled call)")
    prov._before = p.grad


def _accumulated(prov: GradProvenance, p: torch.Tensor) -> None:
    """Post-accumulate hook: bind the arrival's verdict to the `.grad` it was accumulated into."""
    before, prov._before = prov._before, None
    prov.arrivals = 1 if before is None else prov.arrivals + 1
    prov.runs = prov._arrival_runs if before is None else prov.runs | prov._arrival_runs
    prov._arrival_runs = frozenset()
    if before is None:
        prov.foreign = prov._arrival
    elif prov.grad is None or prov.grad() is not before:
        prov.foreign = "its .grad was set outside a flashdp graph's backward before this backward added to it"
    elif prov._arrival is not None:
        prov.foreign = prov._arrival
    prov.grad = weakref.ref(p.grad) if p.grad is not None else None
    prov._arrival = None


def _watch(p: torch.Tensor, name: str) -> GradProvenance:
    prov = _PROVENANCE.get(p)
    if prov is None:
        prov = GradProvenance(name)
        _PROVENANCE[p] = prov
        if p.is_leaf:  # a non-leaf tensor never holds a .grad an optimizer steps with
            # the hooks hold the record itself (a tensor's record is never replaced): no lookup per backward
            p.register_hook(lambda g, pref=weakref.ref(p), prov=prov: _arrived(pref, prov, g))
            p.register_post_accumulate_grad_hook(lambda t, prov=prov: _accumulated(prov, t))
    return prov


class _ClipTap(torch.autograd.Function):
    """Identity on the parameters of one graph call; its backward marks what the clipping graph delivered, and
    with how many probes that backward estimated norms (`runs`, empty for exact norms)."""

    @staticmethod
    def forward(ctx, runs, provs, *params):
        ctx.runs = runs
        ctx.provs = provs
        ctx.backwards = 0
        ctx.set_materialize_grads(False)
        # returned as they came: autograd makes each output a view of its input in C++ (no Python view per tensor)
        return params

    @staticmethod
    def backward(ctx, *grads):
        ctx.backwards += 1
        for prov, g in zip(ctx.provs, grads):
            if g is None:
                continue
            prov.pending.append(g)
            prov.pending_runs |= ctx.runs
            prov.replayed |= ctx.backwards > 1  # retain_graph: the same samples' clipped sums counted again
        return (None, None, *grads)


def _check_consistent(prov: GradProvenance, record: GraphClipping, position: int) -> None:
    """Every graph compiled with the same options must randomize the same parameters (a batch-size-1 graph finds
    its randomized sites from the weight gradient's ops, a batched graph from the site analysis). Otherwise one
    sample would be clipped by its exact norm in one micro-batch and by an estimate in another, which the privacy
    analysis does not cover: refused, naming the parameter, before this call runs."""
    mine = position in record.randomized_positions
    if record.classified:
        for other, theirs in prov.graphs.items():
            if other.classified and other.options_key == record.options_key and theirs != mine:
                name = record.names[position]
                raise DPCompileError(
                    f"randomized norms: this graph {'estimates' if mine else 'computes exactly'} the per-sample "
                    f"norm of parameter `{name}`, but another graph compiled with the same options "
                    f"{'computes it exactly' if mine else 'estimates it'} (batch-size-1 graphs recognise "
                    "randomized sites from the weight gradient's ops, batched graphs from the site analysis, and "
                    "here they disagree). Every sample must get the same estimator whatever micro-batch it lands "
                    f"in; leave `{name}` out of the 'randomized' strategy globs")
    prov.graphs[record] = mine
    _GRAPHS_EPOCH[0] += 1


def tap(record: GraphClipping, params: list) -> list:
    """Route one graph call's trainable parameters through the tap; returns what to pass the graph instead."""
    provs = _TAPPED.get(record)
    if provs is None or len(provs[0]) != len(params) or not all(map(_is_ref_of, provs[0], params)):
        refs, found = [], []
        for k, p in enumerate(params):
            prov = _watch(p, record.names[k])
            if record not in prov.graphs:
                _check_consistent(prov, record, k)
            refs.append(weakref.ref(p))
            found.append(prov)
        # the same tensors at the next call (every step of a training loop) have the same records, already
        # checked against this graph: a call then costs one identity test per parameter, not a lookup
        provs = _TAPPED[record] = (refs, tuple(found))
    return list(_ClipTap.apply(record.runs, provs[1], *params))


def _is_ref_of(ref: "weakref.ref", p: torch.Tensor) -> bool:
    return ref() is p


#: graph record -> (weak references to the tensors its last call tapped, their records)
_TAPPED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------------------
# run-time thresholds (max_grad_norm="adaptive")

#: parameter -> the RuntimeThresholds object (privacy/adaptive.py AdaptiveClipping) that chooses its graphs' C_g
_RUNTIME_THRESHOLDS = _ByIdentity()


def bind_runtime_thresholds(params, owner) -> None:
    """The thresholds of every adaptive graph call that receives these parameters come from `owner`, which has
    `thresholds(groups, device) -> (G,) float64 tensor, version` (run time, by group name) and
    `deliver(groups, counts, version)` (the call's quantile counts, from its backward; `version` is what
    `thresholds` returned with them, so that counts of a call that read older thresholds are told apart). A parameter bound to another
    owner is refused: two optimizers would each believe they chose its clipping."""
    for p in params:
        other = _RUNTIME_THRESHOLDS.get(p)
        if other is not None and other is not owner:
            raise DPCompileError("adaptive clipping: a parameter is already managed by another "
                                 "DPOptimizer(max_grad_norm='adaptive'); one optimizer per parameter")
        _RUNTIME_THRESHOLDS[p] = owner


def unbind_runtime_thresholds(params, owner) -> None:
    for p in params:
        if _RUNTIME_THRESHOLDS.get(p) is owner:
            del _RUNTIME_THRESHOLDS[p]


def runtime_thresholds_of(p: torch.Tensor):
    return _RUNTIME_THRESHOLDS.get(p)


class _CountTap(torch.autograd.Function):
    """Identity on the thresholds tensor of one graph call; its backward receives the graph's quantile counts (the
    "gradient" the pass puts on that input) and hands them to the owner with the version of the thresholds the call
    read."""

    @staticmethod
    def forward(ctx, owner, groups, version, thresholds):
        ctx.owner, ctx.groups, ctx.version = owner, groups, version
        return thresholds.view_as(thresholds)

    @staticmethod
    def backward(ctx, counts):
        if counts is not None:
            ctx.owner.deliver(ctx.groups, counts.detach(), ctx.version)
        return None, None, None, None


def threshold_input(record: GraphClipping, params: list, device, needs_counts: bool) -> torch.Tensor:
    """The thresholds tensor one call of an adaptive graph takes: C_g of record.runtime_groups from the owner bound
    to its parameters. needs_counts: the call can backpropagate; its counts are then delivered to the owner.
    Refused, naming a parameter, when a call that can backpropagate has parameters no owner (or several) chose."""
    owners = {id(o): o for o in (_RUNTIME_THRESHOLDS.get(p) for p in params) if o is not None}
    if len(owners) != 1 or (needs_counts and any(_RUNTIME_THRESHOLDS.get(p) is None for p in params)):
        if not needs_counts and not owners:  # no backward: the thresholds are never read
            return torch.ones(len(record.runtime_groups), dtype=torch.float64, device=device)
        unbound = [record.names[k] for k, p in enumerate(params) if _RUNTIME_THRESHOLDS.get(p) is None]
        why = (f"parameter `{unbound[0]}` is managed by no DPOptimizer(max_grad_norm='adaptive')" if unbound
               else "its parameters are managed by several adaptive optimizers")
        raise DPCompileError(
            f"adaptive clipping: this graph was compiled with max_grad_norm='adaptive' (its thresholds are chosen at "
            f"run time by the optimizer), but {why}. Build DPOptimizer(..., max_grad_norm='adaptive') (or "
            "dpcompile.make_private(..., max_grad_norm='adaptive')) over the model's parameters before the first "
            "forward")
    owner = next(iter(owners.values()))
    values, version = owner.thresholds(record.runtime_groups, device)
    if not needs_counts:
        return values
    return _CountTap.apply(owner, tuple(record.runtime_groups), version, values.detach().requires_grad_(True))
