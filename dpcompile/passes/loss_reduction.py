"""Is the loss the declared reduction of per-sample terms? (issue 24 item 4; docs/gradient-contract.md, "What the
loss must be")

`loss_reduction="mean"` tells the pass that the graph's loss is L = (1/B) Σ_i ℓ_i, and the pass multiplies each
sample's gradient by B before it measures and sums it; `"sum"` that L = Σ_i ℓ_i. A sum loss declared "mean" would
give Σ_i clip(B·g_i), a mean loss declared "sum" Σ_i clip(g_i / B): bounded, but not the contract. So the form of
every loss the graph returns is read from the graph and compared with the declaration, or the graph is refused.

How a loss is read. Every scalar the backward starts from (a forward output with a tangent) whose batch-dim state is
Mixed must be built from per-sample values by

  - a sum or a mean over dims that include the batch dim of a value that carries samples (BDim);
  - then sums and means over the other dims, views, casts, negation;
  - products with, and divisions by, values that carry no sample (numbers, sizes, parameters);
  - sums of such terms (and of values that carry no sample).

Its *form* is the exponent e in L = B^e · κ · Σ_i ℓ_i (κ free of B): 0 for a sum, -1 for a mean. The exponent counts
the batch size where the graph says it is one: a mean over the batch dim divides by B (times the other reduced
sizes: a token mean over B·T tokens is (1/B) Σ_i (token mean of sample i), a mean), F.cross_entropy's default
mean divides by the count of targets that it checks at run time to be all of them (B·k), and a division by a size
that is the batch size (x.shape[0]) divides by B. A size or number that only *equals* B where this graph is valid
(a literal 2 in a graph compiled for a static batch of 2, or a symbol shared by B and T after duck sizing) may be
read either way: the exponent is then a range, and the declaration is accepted when it lies in it (mark the batch
dim dynamic, as dpcompile.compile does, to have the exact reading). Anything else — a division by a value that
depends on several samples or on a tensor input, a loss that is not linear in the per-sample terms, an op this
reader does not know — is refused as unreadable, naming the op.
"""
from __future__ import annotations

import itertools
from typing import Optional

import sympy
import torch
import torch.fx as fx

from ..errors import LossReductionError
from .batchdim import _REDUCTIONS, BDim, Mixed, _arg, _norm_dim, node_location, op_name
from .graph_io import tangent_outputs
from .symbolic import prod, rank_of, sizes_of, sym_expr

aten = torch.ops.aten
prims = torch.ops.prims

#: a factor the graph says is this call's batch size (the count of targets of a checked cross_entropy mean, a
#: mean over the batch dim): counted whatever its value
BATCH = sympy.Symbol("dpcompile_B", positive=True)

_SUMS = {aten.sum.default, aten.sum.dim_IntList, prims.sum.default}
_MEANS = {aten.mean.default, aten.mean.dim}
# ops through which a loss keeps its form (values unchanged, up to shape and dtype)
_SAME = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.unsqueeze.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
    aten._to_copy.default, prims.convert_element_type.default, aten.permute.default, aten.t.default,
}
# ops that compute a value from one operand without changing it (for values that carry no sample)
_VALUE_SAME = _SAME | {aten.expand.default, aten.lift_fresh_copy.default, aten.detach.default,
                       aten.scalar_tensor.default}
_NAMES = {0: "a sum over samples, Σ_i ℓ_i (nothing divides it by the batch size)",
          -1: "a mean over samples, (1/B) Σ_i ℓ_i"}
_DECLARED = {"sum": 0, "mean": -1}


class Unreadable(Exception):
    def __init__(self, node, why: str):
        super().__init__(why)
        self.node, self.why = node, why


def check_loss_reduction(graph: fx.Graph, analysis, n_primals: int, user_inputs, declared: str) -> None:
    """Raise LossReductionError unless every loss the backward starts from has the declared form (module doc).
    user_inputs: the placeholders of the call's tensor arguments (a factor computed from parameters, buffers and
    constants alone is free of B; one computed from an argument or a size is read or refused)."""
    reader = _Reader(analysis, set(user_inputs))
    want = _DECLARED[declared]
    for tangent, output in tangent_outputs(graph, n_primals):
        if output is None or not tangent.users or not isinstance(analysis.state(output), Mixed):
            continue  # a per-sample output (the loss is outside: backend warns) or one that carries no sample
        try:
            lo, hi, origin = reader.form(output)
        except Unreadable as e:
            raise LossReductionError(
                f"flashdp: cannot verify loss_reduction={declared!r}: the loss `{output.name}` is not read as a sum "
                f"or a mean of per-sample terms: {e.why} at op `{e.node.name}` ({op_name(e.node.target)})"
                f"{node_location(e.node)}. Return Σ_i ℓ_i (loss_reduction='sum') or (1/B) Σ_i ℓ_i with B = the "
                "batch size of the call (loss_reduction='mean'), each ℓ_i computed from sample i alone (e.g. "
                "F.cross_entropy(..., reduction='sum') / x.shape[0], or per-sample losses then .mean())") from None
        if lo <= want <= hi:
            continue
        if lo == hi:
            found = _NAMES.get(lo, f"B^{lo} · Σ_i ℓ_i")
        else:
            found = f"B^e · Σ_i ℓ_i with e in [{lo}, {hi}]"
        if declared == "mean":
            fix = ("divide the sum by this call's batch size (loss.sum() / x.shape[0], or .mean() over samples), or "
                   "declare loss_reduction='sum' here and in DPOptimizer")
            if lo == hi == 0:
                fix += ("; a division by a fixed number (an expected batch size) is not a mean: declare 'sum' and "
                        "let DPOptimizer divide by expected_batch_size")
        else:
            fix = ("declare loss_reduction='mean' here and in DPOptimizer, or return the sum over samples "
                   "(reduction='sum', no division by the batch size)")
        raise LossReductionError(
            f"flashdp: loss_reduction={declared!r} is declared, but the loss `{output.name}` is {found}, formed at "
            f"op `{origin.name}` ({op_name(origin.target)}){node_location(origin)}. The pass would clip "
            f"{'B·g_i' if want < lo else 'g_i / B'} instead of each sample's gradient g_i. Fix: {fix}")


class _Reader:
    def __init__(self, analysis, user_inputs: set):
        self.a = analysis
        self.user_inputs = user_inputs
        self.B = sym_expr(analysis.B)
        self.env = analysis.shape_env
        self.fresh = (sympy.Symbol(f"dpcompile_k{i}", positive=True) for i in itertools.count())
        self.values: dict = {}

    # -- the loss's form: (lo, hi, the node that reduced the batch) ------------------------------------------
    def form(self, node: fx.Node):
        state = self.a.state(node)
        if not isinstance(state, Mixed):
            return None  # carries no sample (state None) or is per-sample (BDim): no form of its own
        t = node.target
        if t in _SUMS or t in _MEANS:
            x = node.args[0]
            sx = self.a.state(x)
            rank = rank_of(x)
            dims = _arg(node, _REDUCTIONS[t][0]) if _REDUCTIONS[t][0] is not None else None
            dims = list(range(rank)) if dims in (None, []) else [dims] if isinstance(dims, int) else list(dims)
            dims = [_norm_dim(d, rank) for d in dims]
            numel = prod([sizes_of(x)[d] for d in dims])
            if isinstance(sx, BDim):
                if sx.dim not in dims:
                    raise Unreadable(node, "a reduction that keeps the batch dim yet combines samples")
                if t in _SUMS:
                    return 0, 0, node
                per_sample = self.a._quotient(numel, self.B)  # B*inner*(other reduced sizes) / B
                if per_sample is None:
                    raise Unreadable(node, f"a mean over {numel} elements, not a whole number of elements per sample")
                lo, hi = self._exponents(BATCH * per_sample, node, sizes=False)
                return -hi, -lo, node
            inner = self._form_of(x, node)
            if t in _SUMS:
                return inner
            lo, hi = self._exponents(numel, node, sizes=False)
            return inner[0] - hi, inner[1] - lo, inner[2]
        if t in _SAME or t is aten.neg.default:
            return self._form_of(node.args[0], node)
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = node.args[:2]
            carrying = [i for i, v in enumerate((a, b)) if isinstance(v, fx.Node) and self.a.state(v) is not None]
            if len(carrying) != 1 or (t in (aten.div.Tensor, aten.div.Scalar) and carrying != [0]):
                raise Unreadable(node, "a product or quotient of values that carry samples")
            inner = self._form_of((a, b)[carrying[0]], node)
            lo, hi = self._exponents(self.value((a, b)[1 - carrying[0]], node), node)
            if t in (aten.div.Tensor, aten.div.Scalar):
                lo, hi = -hi, -lo
            return inner[0] + lo, inner[1] + hi, inner[2]
        if t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
            alpha = node.kwargs.get("alpha", 1)
            forms = []
            for i, v in enumerate(node.args[:2]):
                if not isinstance(v, fx.Node) or self.a.state(v) is None:
                    continue  # a term that carries no sample (a constant, a parameter's regulariser)
                f = self._form_of(v, node)
                if i == 1 and alpha != 1:
                    lo, hi = self._exponents(self.value(alpha, node), node)
                    f = (f[0] + lo, f[1] + hi, f[2])
                forms.append(f)
            lo, hi = max(f[0] for f in forms), min(f[1] for f in forms)
            if lo > hi:
                raise Unreadable(node, "a sum of losses with different reductions (one divided by the batch size, "
                                       "one not)")
            return lo, hi, forms[0][2]
        raise Unreadable(node, "an op on the loss that is not a sum, mean, product or quotient by a number")

    def _form_of(self, x, user: fx.Node):
        if not isinstance(x, fx.Node) or not isinstance(self.a.state(x), Mixed):
            raise Unreadable(user, "a value that carries samples but is not a reduction over the batch")
        return self.form(x)

    # -- values that carry no sample: sympy expressions --------------------------------------------------------
    def value(self, v, user: fx.Node) -> sympy.Expr:
        if isinstance(v, bool) or v is None:
            raise Unreadable(user, f"a factor {v!r}")
        if isinstance(v, (int, float)):
            return sympy.nsimplify(v) if isinstance(v, float) else sympy.Integer(v)
        if isinstance(v, (torch.SymInt, torch.SymFloat)):
            return sympy.sympify(sym_expr(v) if isinstance(v, torch.SymInt) else v.node.expr)
        if not isinstance(v, fx.Node):
            raise Unreadable(user, f"a factor {v!r}")
        if v not in self.values:
            self.values[v] = self._value(v)
        return self.values[v]

    def _value(self, v: fx.Node) -> sympy.Expr:
        if self.a.state(v) is not None:
            raise Unreadable(v, "a factor that depends on samples (a normaliser computed over the batch)")
        val = v.meta.get("val")
        if isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool):
            return self.value(val, v)
        count = v.meta.get("dpcompile_checked_count")
        if count is not None:  # the targets of a cross_entropy mean, checked at run time to be all B*k of them
            return BATCH * count
        t = v.target
        if t in _VALUE_SAME:
            return self.value(v.args[0], v)
        if t is aten.full.default:
            return self.value(v.args[1], v)
        if t in (aten.mul.Tensor, aten.mul.Scalar):
            return self.value(v.args[0], v) * self.value(v.args[1], v)
        if t in (aten.div.Tensor, aten.div.Scalar):
            return self.value(v.args[0], v) / self.value(v.args[1], v)
        if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            sign = 1 if t in (aten.add.Tensor, aten.add.Scalar) else -1
            return self.value(v.args[0], v) + sign * self.value(v.kwargs.get("alpha", 1), v) * self.value(v.args[1], v)
        if t is aten.neg.default:
            return -self.value(v.args[0], v)
        if t is aten.reciprocal.default:
            return 1 / self.value(v.args[0], v)
        if self._constant(v):
            return next(self.fresh)  # a function of parameters, buffers and constants only: free of B
        raise Unreadable(v, "a factor whose value dpcompile cannot read (computed from a tensor input or a size)")

    def _constant(self, v: fx.Node) -> bool:
        """v depends on nothing but parameters, buffers and constants (no argument of the call, no size)."""
        seen, todo = set(), [v]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder" and (n in self.user_inputs or n.name.startswith("tangents")):
                return False
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape):
                return False
            if isinstance(val, (torch.SymInt, torch.SymFloat)):
                return False
            todo.extend(n.all_input_nodes)
        return True

    # -- how many times a value holds the batch size ---------------------------------------------------------
    def _exponents(self, v: sympy.Expr, node: fx.Node, sizes: bool = True):
        """(lo, hi): the powers of B that v may hold. BATCH counts once each; a power of a symbolic B counts once
        for the first factor and 0 or 1 for each further one (a symbol shared by B and another size), or 0 or 1
        for every one when `sizes` is False (sizes within a sample, the batch already counted as BATCH); a number
        that is a multiple of a static B counts 0 or 1 for each factor of B it holds."""
        v = sympy.factor(sympy.sympify(v))
        d = _power(v, BATCH)
        if d is None:
            raise Unreadable(node, f"a factor {v} that is not the batch size times a factor free of it")
        w = sympy.simplify(v / BATCH ** d)
        sizes = sizes and d == 0  # the batch already counted: the sizes beside it are within a sample
        B = self.B
        if B.free_symbols:
            k = _power(w, B)
            if k is None:
                raise Unreadable(node, f"a factor {w} that depends on the batch size {B} other than as a power")
            if not sizes or k == 0:
                return d + min(k, 0), d + max(k, 0)
            return (d + k, d - 1) if k < 0 else (d + 1, d + k)
        b = int(B)
        coeff = w.as_coeff_Mul()[0]
        if b < 2 or not isinstance(coeff, sympy.Rational):
            return d, d
        k = _valuation(int(coeff.p), b) - _valuation(int(coeff.q), b)
        return (d + min(k, 0), d + max(k, 0))


def _power(v: sympy.Expr, base: sympy.Expr) -> Optional[int]:
    """k with v / base**k free of base's symbols (base a symbol or a product of sizes), or None."""
    symbols = base.free_symbols
    for k in (0, -1, 1, -2, 2, -3, 3):
        rest = sympy.simplify(v / base ** k)
        if not (rest.free_symbols & symbols):
            return k
    return None


def _valuation(n: int, b: int) -> int:
    k = 0
    while n and n % b == 0:
        n //= b
        k += 1
    return k
