"""Every dpcompile:: op is defined through `dp_op` (a torch.library triton_op) or `dp_custom_op` (a custom_op),
which require its role. The pass reads roles from here, never from a hand-kept list:

  norm          returns per-sample squared norms (possibly with what the clipped sum reads next to them)
  clipped_sum   returns sum_i coef_i g_i (possibly with the clip coefficients): the coverage check
                (passes/verify.py) accepts a parameter's gradient only if it comes out of one of these
  prepare       an intermediate of a site's norm / sum (row sums, stored products)

An op defined with `dp_op` (a triton_op) is inlined under Inductor (passes/rewrite.py: inline_ops), so that
Inductor emits its Triton launches and fuses its PyTorch parts; a `dp_custom_op` stays an opaque call (it needs
concrete sizes, or data-dependent shapes). The role is keyword-only and has no default: an op cannot be defined
without one.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = "dpcompile"
ROLES = ("norm", "clipped_sum", "prepare")


class _Entry:
    __slots__ = ("name", "role", "inline", "own_fake")

    def __init__(self, name: str, role: str, inline: bool):
        self.name, self.role, self.inline = name, role, inline
        self.own_fake = False  # a dp_op given fake=: its metadata function, not its body, runs on fake tensors

    @property
    def overload(self):
        return getattr(getattr(torch.ops, LIB), self.name).default


_OPS: dict[str, _Entry] = {}


def _register(name: str, role: str, inline: bool) -> None:
    if role not in ROLES:
        raise ValueError(f"op {LIB}::{name}: role {role!r} is not one of {ROLES}")
    if name in _OPS and (_OPS[name].role, _OPS[name].inline) != (role, inline):
        raise ValueError(f"op {LIB}::{name} is already registered with role {_OPS[name].role!r}")
    _OPS[name] = _Entry(name, role, inline)


def dp_op(*, role: str, name: str | None = None, fake: Callable | None = None, **kwargs) -> Callable:
    """Decorator: `fn` as the triton_op dpcompile::<name> (default: fn's name), with `role`; inlined under
    Inductor. fake: the op's output metadata from its inputs' (a triton_op's own fake runs the whole body on fake
    tensors, dozens of symbolic-size ops per call; the pass calls these ops thousands of times while tracing).
    It must give the body's shapes, strides and dtypes on every device (tests/test_op_fakes.py checks)."""

    def wrap(fn):
        op_name = name or fn.__name__
        _register(op_name, role, inline=True)
        op = torch.library.triton_op(f"{LIB}::{op_name}", mutates_args=(), **kwargs)(fn)
        if fake is not None:
            op.register_fake(fake)
            _OPS[op_name].own_fake = True
        return op

    return wrap


def dp_custom_op(*, role: str, name: str | None = None, **kwargs) -> Callable:
    """Decorator: `fn` as the custom_op dpcompile::<name> (default: fn's name), with `role`; register its fake
    implementation on the returned op as usual. Not inlined."""

    def wrap(fn):
        op_name = name or fn.__name__
        _register(op_name, role, inline=False)
        return torch.library.custom_op(f"{LIB}::{op_name}", mutates_args=(), **kwargs)(fn)

    return wrap


def ops_with_role(role: str) -> set:
    """The op overloads registered with `role`."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    return {e.overload for e in _OPS.values() if e.role == role}


def inlined_ops() -> set:
    """The op overloads Inductor graphs get the bodies of (every dp_op)."""
    return {e.overload for e in _OPS.values() if e.inline}


def ops_with_own_fake() -> set:
    """The names of the dp_ops whose fake is a metadata function (dp_op's fake=)."""
    return {e.name for e in _OPS.values() if e.own_fake}


def role_of(name: str) -> str | None:
    """The role of dpcompile::<name>, or None for an op not defined here."""
    e = _OPS.get(name)
    return e.role if e else None
