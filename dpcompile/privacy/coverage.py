"""What the compiled graphs vouched for, read from the clipping records the gradients carry (clip_provenance.py)
and checked by DPOptimizer (optimizer.py) and DistributedDPOptimizer before any noise is added: that a flashdp graph
clipped a parameter (coverage), the bound their thresholds put on one sample's clipped gradient (sensitivity), and
the randomized norms they ran (what the accountant must be told)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..clip_provenance import clipped_by_some_graph, graphs_epoch, provenance
from ..errors import DPCompileError
from ..randomized_contract import accounting_probes
from .randomized_accounting import RandomizedSpec

#: relative slack when comparing the graphs' sensitivity with the optimizer's C (sqrt / sums of floats)
SENSITIVITY_RTOL = 1e-9


def is_privatized(p: torch.Tensor) -> bool:
    """Some flashdp graph call delivered a clipped gradient to `p` (clip_provenance.py)."""
    return clipped_by_some_graph(p)


def _graphs_by_set(params, provs: Optional[list] = None) -> dict:
    """frozenset(ids of `params` a graph clipped) -> the graphs over that set, from every graph call that
    delivered a clipped gradient to one of `params` (recorded at run time: a graph reused for another model
    instance counts for that instance's tensors). Read-only for callers: the answer is kept until a record gains
    a graph (clip_provenance.graphs_epoch), for the same tensors with the same records (a dead tensor's id taken by
    a new one comes with another record, or none: a different key whatever the caller passes). provs: the
    records of `params`, when the caller has looked them up."""
    pairs = list(zip(params, provs)) if provs is not None else [(p, provenance(p)) for p in params]
    key = (graphs_epoch(), tuple((id(p), id(prov)) for p, prov in pairs))
    hit = _BY_SET_CACHE.get(key)
    if hit is not None:
        return hit
    members: dict = {}  # graph -> ids of the tensors of `params` it clipped
    for p, prov in pairs:
        for graph in (prov.graphs if prov is not None else ()):
            members.setdefault(graph, set()).add(id(p))
    by_set: dict = {}
    for graph, ids in members.items():
        by_set.setdefault(frozenset(ids), []).append(graph)
    if len(_BY_SET_CACHE) >= 8 or any(k[0] != key[0] for k in _BY_SET_CACHE):
        _BY_SET_CACHE.clear()
    _BY_SET_CACHE[key] = by_set
    return by_set


#: (graphs_epoch(), ids of the tensors) -> _graphs_by_set's answer: two reads a step (sensitivity, accounting)
_BY_SET_CACHE: dict = {}


def _disjoint(sets) -> bool:
    sets = list(sets)
    return all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])


def clipped_sensitivity(params, provs: Optional[list] = None) -> float:
    """An upper bound on the L2 norm of one sample's clipped gradient over `params` (privatized tensors), from
    the thresholds of every graph that privatized them.

    Graphs over the same parameter set are recompilations (other batch sizes): a sample goes through one of
    them, so their largest sensitivity counts. Graphs over disjoint parameter sets (a model compiled piecewise)
    each add their clipped part: sqrt(sum S^2). If the sets overlap, a parameter may get a clipped part from
    each: the triangle inequality's sum S is the bound.
    """
    by_set = _graphs_by_set(params, provs)
    if not by_set:
        return 0.0
    sens = {key: max(g.sensitivity for g in graphs) for key, graphs in by_set.items()}
    if _disjoint(sens):
        return math.sqrt(sum(s * s for s in sens.values()))
    return sum(sens.values())


def randomized_accounting(params, max_grad_norm_total: float, provs: Optional[list] = None) -> Optional[dict]:
    """What PrivacyAccountant.step needs about the randomized norms of the graphs that privatized `params`:
    {"probes", "variant", "group_weights"}, or None when none of them has a randomized site.

    group_weights: C_g^2 / C^2 (C = max_grad_norm_total, the noise's C) for every clipping group holding a
    randomized site, over all graphs (recompilations of one parameter set count a group once, at its largest
    C_g); None for a single group holding the whole C (flat clipping). probes / variant: those of the graph with
    the fewest effective probes (the accountant switches to the Chernoff envelope itself when the counts that ran
    are not multiples of one another). Graphs over overlapping, unequal parameter sets are refused: their
    sensitivities add up (triangle inequality), outside the per-group analysis."""
    by_set = _graphs_by_set(params, provs)
    groups: dict = {}
    kinds = set()
    for key, graphs in by_set.items():
        for graph in graphs:
            if graph.randomized_groups:
                kinds.add((graph.probes, graph.variant))
                for g, c in graph.randomized_groups.items():
                    groups[(key, g)] = max(groups.get((key, g), 0.0), float(c))
    if not groups:
        return None
    if not _disjoint(by_set):
        raise DPCompileError(
            "randomized norms: the parameters were clipped by graphs over overlapping but different parameter sets "
            "(the same parameter compiled into two different graphs); their randomized sensitivities cannot be "
            "accounted per clipping group. Compile each parameter in one graph")
    probes, variant = min(kinds, key=lambda kv: (accounting_probes(*kv), kv))
    c2 = float(max_grad_norm_total) ** 2
    weights = [c * c / c2 for c in groups.values()]
    if len(weights) == 1 and abs(weights[0] - 1.0) <= 1e-9:
        weights = None  # one group holding the whole threshold: the one-group law
    return {"probes": probes, "variant": variant, "group_weights": weights}


def sensitivity_problem(clipped: list, max_grad_norm_total: float, who: str,
                        provs: Optional[list] = None) -> Optional[DPCompileError]:
    """Why the gradients of `clipped` (privatized tensors) cannot be noised for max_grad_norm_total, or None."""
    bound = clipped_sensitivity(clipped, provs)
    if bound > max_grad_norm_total * (1 + SENSITIVITY_RTOL):
        return DPCompileError(
            f"{who}: the compiled graphs bound one sample's clipped gradient by {bound:.6g} (the root of the sum of "
            f"their squared thresholds), but the noise is calibrated to max_grad_norm={max_grad_norm_total:.6g}: "
            "the gradients would be under-noised. Give the optimizer the max_grad_norm the model was compiled with "
            "(or its per-group dict). Every graph clips to its own max_grad_norm: when a model is compiled as K "
            "separate graphs (FSDP2 units compiled one by one), give each C / sqrt(K), or compile the whole model "
            "as one graph")
    return None


def _same_spec(a: dict, b: dict) -> bool:
    def spec(d):
        return RandomizedSpec.make(d["probes"], d["variant"], d.get("group_weights"))

    sa, sb = spec(a), spec(b)
    if sa.probes != sb.probes or (sa.group_weights is None) != (sb.group_weights is None):
        return False
    if sa.group_weights is None:
        return True
    wa, wb = sorted(sa.group_weights), sorted(sb.group_weights)
    return len(wa) == len(wb) and all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in zip(wa, wb))


def _uncovered_message(p: torch.Tensor, why: str, name: Optional[str] = None) -> str:
    who = f"parameter `{name}`" if name else f"a parameter of shape {tuple(p.shape)}"
    return (f"{who} has a gradient that cannot be noised as a clipped sum: {why}. Compile the model with "
            "dpcompile.compile / backend='flashdp' and keep every use of the parameter inside one compiled call")
