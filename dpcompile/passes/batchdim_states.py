"""The batch-dim analysis' states (BDim, Mixed), the helpers its rules share, and the rule registry.

batchdim.py holds the engine (the graph walk and the generic fallbacks); passes/batchdim_rules/ holds one module per
op family, each rule a function `fn(analysis, node) -> state` registered with `@batchdim_rule(*ops)`. This module
imports nothing of the package: the rules import it, batchdim.py imports the rules (no import cycle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass(frozen=True)
class BDim:
    dim: int
    inner: Any = sympy.Integer(1)  # sympy expression


@dataclass(frozen=True)
class Mixed:
    origin: fx.Node
    reason: str
    unknown: bool = False  # True: not known to mix samples, but not understood either
    #: True: understood at the traced sizes, but not provable for every value of the symbolic sizes (a length padded
    #: to a multiple of a chunk, then split into chunks: FloorDiv / Mod): refused as SymbolicLayoutError, which
    #: dpcompile.compile answers by recompiling with static sequence dims
    symbolic: bool = False

    def describe(self) -> str:
        return f"{self.reason} at op `{self.origin.name}` ({op_name(self.origin.target)}){node_location(self.origin)}"


State = Any  # None | BDim | Mixed | tuple of states


def op_name(target) -> str:
    """An op's name as messages and explain print it (aten.mm.default -> "mm.default")."""
    return getattr(target, "__name__", None) or str(target)


def node_location(node: fx.Node) -> str:
    """A short 'from <module> (<file:line>)' hint for error messages, when Dynamo recorded one."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = getattr(cls, "__name__", str(cls)).split(".")[-1]
        parts.append(f"in {cls_name} `{_clean_module_path(path)}`")
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().strip("^~ ")]
        if lines:
            parts.append(f"code: {lines[-1]}")
    return (" " + "; ".join(parts)) if parts else ""


def _clean_module_path(path: str) -> str:
    # L['self']._modules['fc1']  ->  fc1
    import re

    names = re.findall(r"_modules\['([^']+)'\]", path)
    if names:
        return ".".join(names)
    return path


def _arg(node: fx.Node, idx, default=None):
    if isinstance(idx, str):
        return node.kwargs.get(idx, default)
    if idx < len(node.args):
        return node.args[idx]
    return default


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _packet_name(target) -> str:
    return getattr(getattr(target, "_overloadpacket", None), "__name__", "")


def _flatten_nodes(x) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(x, lambda n: out.append(n) or n)
    return out


def _flatten_states(s):
    if isinstance(s, tuple):
        for x in s:
            yield from _flatten_states(x)
    else:
        yield s


# ----------------------------------------------------------------------------------------------------------
# the rule registry: op overload -> fn(analysis, node) -> state; and, for ops found by their overload packet's name
# (Inductor's prims are registered only once Inductor is imported), packet name -> (fn, overload name or None: any)

Rule = Callable[[Any, fx.Node], State]
_HANDLERS: dict = {}
_PACKET_HANDLERS: dict[str, tuple[Rule, Optional[str]]] = {}


def batchdim_rule(*ops, packets=(), overload: Optional[str] = None):
    """Register `fn(analysis, node) -> state` as the batch-dim rule of `ops` (op overloads) and of the ops whose
    overload packet is named in `packets` (of overload `overload` only, where given). The engine calls a rule only
    for a node with a per-sample operand and none that mixes samples; an op has one rule (a second is an error)."""
    ops, packets = tuple(ops), tuple(packets)

    def register(fn: Rule) -> Rule:
        taken = [op_name(op) for op in ops if op in _HANDLERS] + [name for name in packets if name in _PACKET_HANDLERS]
        if taken or len(set(ops)) != len(ops) or len(set(packets)) != len(packets):
            raise ValueError(f"batch-dim rule {fn.__module__}.{fn.__qualname__}: a rule is already registered for "
                             f"{', '.join(taken) or 'an op listed twice'}")
        for op in ops:
            _HANDLERS[op] = fn
        for name in packets:
            _PACKET_HANDLERS[name] = (fn, overload)
        return fn

    return register


def rule_for(target) -> Optional[Rule]:
    """The registered rule of an op: by overload, else by its overload packet's name; None where there is none."""
    handler = _HANDLERS.get(target)
    if handler is not None:
        return handler
    fn, overload = _PACKET_HANDLERS.get(_packet_name(target), (None, None))
    if fn is not None and (overload is None or getattr(target, "_overloadname", None) == overload):
        return fn
    return None
