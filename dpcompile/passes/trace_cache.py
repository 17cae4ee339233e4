"""Traced clipping groups reused across identical blocks (issue 21 item 5: compile time).

The rewrite traces one function per clipping group (norms, clip factors, clipped sums) with make_fx over the
group's input values, whose sizes are symbolic; that tracing was 16.5 of the 21.5 s the pass took on SmolLM2-135M
(benchmarks/NOTES.md, entry 18), and 30 identical decoder blocks trace the same 9 groups 30 times. Here a group's
trace is kept under a canonical form of everything its function reads, and a later group with the same form gets a
copy of the traced nodes with its own inputs instead of a new trace.

The form (`canonical`) walks the group's records (parameter records, sites, chains, strategies, threshold, options)
field by field: graph nodes that are the group's inputs become their position among the inputs, other nodes are
numbered in the order met with their op, target, arguments and value metadata; tensors, sizes and numbers are
kept by value. A parameter record's name and output position (`IGNORED_FIELDS`) are left out: the function never
reads them, which `verify` mode checks. A record of an unknown kind, a randomized group (its probe site ids differ
per parameter), and a trace holding tensor constants are never cached. A user Triton launch is compared by its
constant arguments' values, not by their index into torch's side table (`graph_form`).

`DPCOMPILE_VERIFY_TRACE_CACHE=1` (set by the test suite) traces every hit anyway and refuses a copy that differs
from the fresh trace: every test that compiles a model repeatedly checks that the form misses nothing.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx
from torch._higher_order_ops.triton_kernel_wrap import (
    kernel_side_table,
    triton_kernel_wrapper_functional,
    triton_kernel_wrapper_mutation,
)

#: (record type, field) that the traced function never reads (they differ between identical blocks); by type, so
#: that a field of the same name elsewhere (a strategy's or a site's) stays in the form
IGNORED_FIELDS = frozenset({("ParamGrad", "name"), ("ParamGrad", "out_pos")})


class Uncacheable(Exception):
    """Something in the group's records has no canonical form here: trace it."""


def verify_enabled() -> bool:
    return os.environ.get("DPCOMPILE_VERIFY_TRACE_CACHE", "") not in ("", "0")


def _meta(node: fx.Node) -> Any:
    val = node.meta.get("val")
    return _value(val) if val is not None else None


def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(str(s) for s in v.shape), tuple(str(s) for s in v.stride()), str(v.dtype),
                str(v.device), v.requires_grad)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(v).__name__, str(v.node.expr))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_value(x) for x in v))
    if isinstance(v, dict):  # a functional Triton kernel wrapper's outputs, by argument name
        return ("dict", tuple(sorted((repr(k), _value(x)) for k, x in v.items())))
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                   torch.layout)):
        return (type(v).__name__, repr(v))
    raise Uncacheable(f"value of type {type(v).__name__}")


class _Canonical:
    def __init__(self, inputs: list):
        self.inputs = {n: i for i, n in enumerate(inputs)}
        self.nodes: dict = {}  # node outside the inputs -> its number, in the order met

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, fx.Node):
            return self.node(obj)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return (type(obj).__name__, repr(obj))
        if isinstance(obj, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return (type(obj).__name__, str(obj))
        if isinstance(obj, enum.Enum):
            return ("enum", type(obj).__qualname__, obj.name)
        if isinstance(obj, sympy.Basic):
            return ("sympy", sympy.srepr(obj))
        if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
            return _value(obj)
        if isinstance(obj, (list, tuple)):
            return (type(obj).__name__, tuple(self(x) for x in obj))
        if isinstance(obj, (set, frozenset)):
            return ("set", tuple(sorted((self(x) for x in obj), key=repr)))
        if isinstance(obj, dict):
            return ("dict", tuple(sorted(((self(k), self(v)) for k, v in obj.items()), key=repr)))
        if isinstance(obj, torch._ops.OpOverload) or isinstance(obj, torch._ops.OpOverloadPacket):
            return ("op", str(obj))
        if callable(obj) and hasattr(obj, "__qualname__") and not hasattr(obj, "__self__"):
            if getattr(obj, "__closure__", None):  # a closure's behaviour depends on what it captured
                raise Uncacheable(f"closure {obj.__qualname__}")
            code = getattr(obj, "__code__", None)  # two lambdas of one function share a qualname, not a line
            where = (code.co_filename, code.co_firstlineno) if code is not None else None
            return ("fn", getattr(obj, "__module__", ""), obj.__qualname__, where)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return ("record", type(obj).__module__, type(obj).__qualname__,
                    tuple((f.name, self(getattr(obj, f.name))) for f in dataclasses.fields(obj)
                          if (type(obj).__name__, f.name) not in IGNORED_FIELDS))
        raise Uncacheable(f"object of type {type(obj).__qualname__}")

    def node(self, n: fx.Node) -> Any:
        if n in self.inputs:
            return ("input", self.inputs[n])
        if n in self.nodes:
            return ("node", self.nodes[n])
        self.nodes[n] = len(self.nodes)
        # one level of arguments: nodes among them are numbered (their own arguments are not the function's
        # reads); a placeholder outside the inputs (a parameter) by its value's metadata, not its name
        target = "" if n.op == "placeholder" else str(n.target)
        return ("node", self.nodes[n], n.op, target, self._args((n.args, n.kwargs)), _meta(n))

    def _args(self, args: Any) -> Any:
        if isinstance(args, fx.Node):
            if args in self.inputs:
                return ("input", self.inputs[args])
            if args not in self.nodes:
                self.nodes[args] = len(self.nodes)
            return ("node", self.nodes[args], _meta(args))
        if isinstance(args, (list, tuple)):
            return (type(args).__name__, tuple(self._args(a) for a in args))
        if isinstance(args, dict):
            return ("dict", tuple((k, self._args(v)) for k, v in args.items()))
        return self(args)


def canonical(inputs: list, *parts: Any) -> Optional[tuple]:
    """The canonical form of a group function's reads (None: not cacheable)."""
    form = _Canonical(inputs)
    try:
        return (tuple(_meta(n) for n in inputs), tuple(form(p) for p in parts))
    except Uncacheable:
        return None


#: the higher-order ops a traced user Triton launch becomes (functional before the pass's functionalization, and not)
_TRITON_LAUNCHES = (triton_kernel_wrapper_functional, triton_kernel_wrapper_mutation)


def graph_form(gm: fx.GraphModule) -> tuple:
    """A traced graph's computation with placeholders by position, for comparing two traces of one function:
    size arithmetic (sym_size and friends, whose order depends on which sizes a trace met first) is folded into
    the size expressions the tensor ops receive."""
    index: dict = {}
    out = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            index[n] = ("sym", str(val.node.expr))
            continue
        index[n] = ("n", len(out))
        args = fx.node.map_arg((n.args, _launch_constants(n)), lambda a: index[a])
        out.append((n.op, str(n.target), repr(args), _meta(n) if n.op != "output" else None))
    return tuple(out)


def _launch_constants(n: fx.Node) -> dict:
    """A node's keyword arguments; for a user Triton launch, its constant arguments' values in place of their
    index into torch's side table (every trace registers its constants under a new index, so two traces of one
    function differ only there: the values are what the launch reads)."""
    if n.op != "call_function" or n.target not in _TRITON_LAUNCHES:
        return dict(n.kwargs)
    kwargs = dict(n.kwargs)
    idx = kwargs.pop("constant_args_idx")
    constants = kernel_side_table.get_constant_args(idx)
    kwargs["constant_args"] = tuple(sorted((k, repr(v)) for k, v in constants.items()))
    return kwargs


class GroupTraceCache:
    """key -> traced GraphModule, for one run of the pass (the graphs' symbols belong to its ShapeEnv)."""

    def __init__(self) -> None:
        self._traced: dict = {}
        self._forms: dict = {}  # key -> graph_form of its trace, for verify mode (computed once per key)
        self.hits = 0
        self.misses = 0

    def form(self, key) -> tuple:
        if key not in self._forms:
            self._forms[key] = graph_form(self._traced[key])
        return self._forms[key]

    def get(self, key) -> Optional[fx.GraphModule]:
        if os.environ.get("DPCOMPILE_TRACE_CACHE", "1") == "0":  # off: every group traced (measurements)
            return None
        gm = self._traced.get(key) if key is not None else None
        if gm is not None:
            self.hits += 1
        return gm

    def put(self, key, traced: fx.GraphModule) -> None:
        if key is None:
            return
        self.misses += 1
        if any(n.op == "get_attr" for n in traced.graph.nodes):  # tensor constants: their values are not in the key
            return
        self._traced[key] = traced


def traced_for(cache: GroupTraceCache, key, make: Callable[[], fx.GraphModule]) -> tuple:
    """(the trace for `key`, whether it was reused): the cache's trace of an identical function, else make()'s
    (then kept). In verify mode a reused trace is checked against a fresh one."""
    traced = cache.get(key)
    if traced is None:
        traced = make()
        cache.put(key, traced)
        return traced, False
    if verify_enabled():
        fresh = make()
        if graph_form(fresh) != cache.form(key):
            raise AssertionError("dpcompile trace cache: a reused trace differs from tracing the function anew "
                                 "(the canonical form misses something the function reads)")
    return traced, True
