"""Sizes as sympy expressions, and what the graph's ShapeEnv proves about them without adding a guard (the pass
never specializes a size: a guard would make a compiled graph serve one sequence length).
"""
from __future__ import annotations

from typing import Any, Optional

import sympy
import torch
import torch.fx as fx


def sym_expr(s) -> sympy.Expr:
    """A size as a sympy expression in the graph's canonical symbols: the ShapeEnv's replacements applied (a
    symbol that a guard made equal to another, or to a constant, is written as that one), so that sizes read at
    different times of the compilation compare equal."""
    if isinstance(s, torch.SymInt):
        return canonical(s.node.expr, s.node.shape_env)
    if isinstance(s, sympy.Expr):
        return s
    return sympy.Integer(int(s))


def canonical(expr, shape_env) -> sympy.Expr:
    """expr with the ShapeEnv's replacements applied (no guard is added)."""
    expr = sympy.sympify(expr)
    if shape_env is None or not expr.free_symbols:
        return expr
    return shape_env.replace(expr)


def graph_shape_env(graph: fx.Graph):
    """The ShapeEnv of a graph's fake values (None when every size is static)."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    return s.node.shape_env
    return None


def size_hint(expr, shape_env) -> int:
    """A symbolic size's value at the shapes the graph was traced with, read without adding a guard: for choices
    that are valid at every size and only tuned to it (strategies, launch parameters)."""
    expr = sympy.sympify(expr)
    if not expr.free_symbols:
        return int(expr)
    if shape_env is None:
        raise ValueError(f"no ShapeEnv to give a hint for the symbolic size {expr}")
    expr = canonical(expr, shape_env)
    hint = getattr(shape_env, "optimization_hint", None)  # torch >= 2.13; size_hint before
    return int(hint(expr) if hint is not None else shape_env.size_hint(expr))


def guard_batch_sizes(shape_env, batch_size, sizes: list) -> None:
    """Guard that each size in `sizes` (the batch dim of another sample-carrying input: targets, masks) equals the
    batch size, and solve what that implies. The backend took those inputs to carry samples because their batch
    dim had the batch size at the compiling call; with B and T symbolic, Dynamo only knows products of them equal
    (B*T == B'*T' from a flatten), so the graph must say that B' == B itself (a guard: a call where they differ
    compiles its own graph). The guards are added before the batch-dim analysis reads any size."""
    if shape_env is None:
        return
    for size in sizes:
        if statically_equal(size, batch_size, shape_env):
            continue
        holds = shape_env.evaluate_expr(sympy.Eq(canonical(size, shape_env), canonical(batch_size, shape_env)))
        if not bool(holds):
            raise AssertionError(f"a sample-carrying input has batch size {size}, not {batch_size}, at the compiling "
                                 "call")
    solve_implied_equalities(shape_env)


def solve_implied_equalities(shape_env) -> None:
    """Make the ShapeEnv replace a symbol by another where its guards already imply they are equal but it did not
    solve for it: Eq(s0*s1, s0*s2) with s0 >= 1 implies s1 == s2 (a flatten of (B, T) next to one of (B, T')).
    Re-issuing the implied equality adds no restriction (the guards already hold only where it holds), and the
    replacement lets sizes of different inputs compare equal."""
    seen = set()
    while True:
        before = dict(shape_env.replacements)
        for guard in list(shape_env.guards):
            expr = guard.expr
            if not isinstance(expr, sympy.Eq):
                continue
            diff = canonical(expr.lhs - expr.rhs, shape_env)
            if diff == 0 or not diff.free_symbols or diff in seen:
                continue
            seen.add(diff)
            try:
                _, factors = sympy.factor_list(diff)
            except (sympy.PolynomialError, NotImplementedError):
                continue
            unknown = [f for f, _ in factors if not _provably_positive(f, shape_env)]
            if len(unknown) != 1:
                continue
            zero = unknown[0]
            if zero.is_polynomial() and sympy.Poly(zero).total_degree() == 1 and len(zero.free_symbols) <= 2:
                shape_env.evaluate_expr(sympy.Eq(zero, 0))
        if dict(shape_env.replacements) == before:
            return


def _provably_positive(expr, shape_env) -> bool:
    if expr.is_number:
        return bool(expr > 0)
    try:
        return bool(shape_env.bound_sympy(expr).lower > 0)
    except Exception:  # an expression value ranges cannot bound: not provably positive
        return False


def statically_equal(a, b, shape_env) -> bool:
    """a == b for every value the symbols may take, as far as the ShapeEnv knows (its replacements, ranges and
    guards), without adding a guard. False when unsure."""
    diff = canonical(sympy.sympify(a) - sympy.sympify(b), shape_env)
    if diff == 0:
        return True
    if shape_env is None or not diff.free_symbols:
        return False
    return shape_env._maybe_evaluate_static(sympy.Eq(diff, 0)) == sympy.true


def sizes_of(node: Any) -> Optional[list]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [sym_expr(s) for s in val.shape]
    return None


def rank_of(node: Any) -> Optional[int]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def prod(xs) -> sympy.Expr:
    out = sympy.Integer(1)
    for x in xs:
        out = out * x
    return out


def divides(a: sympy.Expr, b: sympy.Expr) -> bool:
    """True if a | b for every value of the symbols (a, b products of sizes)."""
    if a == 0:
        return b == 0
    q = sympy.cancel(b / a)
    num, den = sympy.fraction(sympy.together(q))
    if den.free_symbols or not den.is_number:
        return False
    if num.free_symbols:
        return bool(den == 1) and num.is_polynomial() and all(
            c.is_integer for c in sympy.Poly(num).coeffs()
        )
    return bool(q.is_integer)


# ----------------------------------------------------------------------------------------------------------
# op rules


def contiguous_strides(shape, strides, shape_env) -> bool:
    """strides are the row-major strides of shape (dims of size 1 may have any stride), for every size."""
    if len(shape) != len(strides):
        return False
    expected = sympy.Integer(1)
    for size, stride in reversed(list(zip(shape, strides))):
        size = sym_expr(size)
        if not statically_equal(size, 1, shape_env) and not statically_equal(sym_expr(stride), expected, shape_env):
            return False
        expected = expected * size
    return True
