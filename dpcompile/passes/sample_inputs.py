"""Which inputs of the graph carry samples, and in which layout, by data flow (issue 24 item 2; the rules are stated
in docs/gradient-contract.md, "Which inputs carry samples").

The batch input (batch_arg, or the first tensor argument) carries samples along batch_dim. Every other tensor
argument of the compiled call is a *candidate* when some dim of it has, at the compiling call, a size that is a
multiple k·B of the batch size B >= 2: a (B, T) target, a (T, B) mask, (B·T,) flattened labels, (B,) weights next to
a batch_dim=1 input, but also a shared (1, T, d) table whose T happens to be a multiple of B. Each candidate layout
— BDim(e, k) (blocks of k consecutive entries per sample: batch-major), and BDim(e, 1) when k > 1 (time-major) — is
tried by running the batch-dim analysis with that input seeded so, and looking at the ops where the input's values
meet values of *other* inputs' samples (an op with an operand that depends on the input and carries samples, and
one that does not depend on it and carries samples):

  - the layout *lines up* when at such an op the samples stay apart (err * mask.t() with the mask's B on dim 1);
  - it *mixes* when seeding it makes such an op combine different samples where it did not before (the mask's T
    dim taken for its samples meets err's batch dim).

One layout that lines up and never mixes: the input carries samples so. Several that do: refused (SampleInputError
naming it). None: if every layout mixes, the input is shared (its dims of size k·B meet other inputs' samples only
at their other dims: a (1, T, d) table added to (B, T, d) activations). Otherwise it never meets other samples in a
way that says either (a normaliser `w.sum()`, a per-sample input on a branch of its own): if it has
exactly one dim of exactly B entries, it is taken to carry samples along it, so that any reduction over them is seen
as mixing and its own per-sample terms are clipped per sample, and a refusal that follows names it; its size there
must then be B wherever the graph is used: equal by the graph's own guards, both static, or made equal by a guard
here (a dim of its own symbol); a static size next to a symbolic B cannot be, and is refused. With no such dim, or
several (k·B entries: batch- or time-major? which dim?), it is refused: a wrong guess would put entries of one
sample into another's clipped gradient.

A layout found for one input can make another one line up (labels that meet only a mask's values), so the tries
repeat until nothing changes. Before the tries, an input with the batch size on batch_dim at this call, as a symbol
of its own, is guarded to have it (`_same_batch_size`): a size relation that lets views be followed, not a
classification. Buffers, attributes and globals are not candidates: they are shared. Nor is an input that reaches
no output of the graph (a mask the model does not use): it cannot move a gradient, whatever its shape says.
"""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from ..errors import DPCompileError, SampleInputError, SymbolicLayoutError
from .batchdim import BatchDimAnalysis, BDim, Mixed, _flatten_states
from .graph_io import dependents
from .symbolic import divides, graph_shape_env, size_hint, solve_implied_equalities, statically_equal, sym_expr


class SampleInputs:
    """The seeds of the batch-dim analysis (placeholder -> BDim) and, per input name, how it was classified."""

    def __init__(self, graph: fx.Graph, ctx, io):
        self.graph, self.io = graph, io
        self.B = sym_expr(io.batch_size)
        self.env = graph_shape_env(graph)
        self.seeds = {io.batch_node: BDim(io.batch_dim)}
        self.names = {io.batch_node: next(iter(ctx.input_sources), "the batch input")}
        self.assumed: dict = {}  # placeholder -> layout taken without evidence (a refusal that follows names it)
        self.shared: list = []
        self.deps: dict = {}  # candidate placeholder -> the nodes that depend on it (computed once)
        candidates = {}
        for idx, name in ctx.sample_candidates.items():
            node = io.primals.get(idx)
            if node is None or node is io.batch_node:
                continue
            self.deps[node] = dependents(graph, {node})
            if not any(n.op == "output" for n in self.deps[node]):
                continue  # reaches no output (an unused mask): it cannot move a gradient, whatever its shape
            self._same_batch_size(node)
            layouts = self._layouts(node)
            self.names[node] = name
            if layouts:
                candidates[node] = layouts
        self._classify(candidates)
        if ctx.options.batch_arg is None:
            self._batch_input_is_unambiguous(ctx, candidates)

    def _same_batch_size(self, node: fx.Node) -> None:
        """An input with the batch size on batch_dim at this call, as its own symbol (targets, masks marked maybe
        dynamic by dpcompile.compile): the graph is made for calls where the two are equal (a guard), so that
        its layout can be followed through views (a (B', T') target flattened next to (B, T) logits: Dynamo only
        knows B*T == B'*T'). Only a size relation: whether it carries samples is still decided by data flow. A
        shared tensor whose size there merely equals B gets a graph of its own at calls where it does not."""
        val = node.meta.get("val")
        d = self.io.batch_dim
        if self.env is None or not isinstance(val, torch.Tensor) or val.dim() <= d:
            return
        S = sym_expr(val.shape[d])
        if not S.free_symbols or statically_equal(S, self.B, self.env):
            return
        try:
            if size_hint(S, self.env) != size_hint(self.B, self.env):
                return
        except Exception:  # noqa: BLE001 - a size without a hint
            return
        self.env.evaluate_expr(sympy.Eq(S, self.B))
        solve_implied_equalities(self.env)

    # -- candidate layouts ----------------------------------------------------------------------------------
    def _layouts(self, node: fx.Node) -> list:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            return []
        B, out = self.B, []
        try:
            hint_b = size_hint(B, self.env)
        except Exception:  # noqa: BLE001 - a batch size without a hint: no candidate by value
            hint_b = None
        for e, size in enumerate(val.shape):
            S = sym_expr(size)
            if divides(B, S) and not statically_equal(S, 0, self.env):
                k = sympy.cancel(S / B)
            elif hint_b is not None and hint_b >= 2:
                try:
                    hs = size_hint(S, self.env)
                except Exception:  # noqa: BLE001
                    continue
                if hs < hint_b or hs % hint_b:
                    continue
                k = sympy.Integer(hs // hint_b)
            else:
                continue
            out.append(BDim(e, k))
            if k != 1:
                out.append(BDim(e, sympy.Integer(1)))
        return out

    # -- trying them ------------------------------------------------------------------------------------------
    def _classify(self, candidates: dict) -> None:
        pending = dict(candidates)
        base = BatchDimAnalysis(self.graph, dict(self.seeds), self.io.batch_size)
        verdicts = {}
        changed = True
        while changed and pending:
            changed = False
            for node, layouts in list(pending.items()):
                lined_up, mixing = [], []
                deps = self.deps[node]
                for layout in layouts:
                    trial = BatchDimAnalysis(self.graph, {**self.seeds, node: layout}, self.io.batch_size,
                                             base=base, changed=deps)
                    up, mixes = self._meets(trial, base, deps)
                    if up and not mixes:
                        lined_up.append(layout)
                    if mixes:
                        mixing.append(layout)
                verdicts[node] = (lined_up, mixing)
                if len(set(lined_up)) > 1:
                    raise SampleInputError(
                        f"flashdp: the input `{self.names[node]}` (shape {_shape(node)}) lines up with the samples of "
                        f"the batch input in several layouts ({', '.join(_layout(l) for l in lined_up)}): dpcompile "
                        "cannot tell which of its entries belong to which sample. Pass it with its samples along one "
                        "dim only")
                if lined_up:
                    self.seeds[node] = lined_up[0]
                    del pending[node]
                    changed = True
                    base = BatchDimAnalysis(self.graph, dict(self.seeds), self.io.batch_size)
        for node, layouts in pending.items():
            lined_up, mixing = verdicts[node]
            if len(mixing) == len(layouts):
                self.shared.append(node)
                continue
            exact = [l for l in layouts if l.inner == 1 and self._k(node, l.dim) == 1]
            if len(exact) != 1:  # k > 1 per sample: batch- or time-major? several dims of B: which one?
                raise SampleInputError(
                    f"flashdp: the input `{self.names[node]}` (shape {_shape(node)}) never lines up with the samples "
                    f"of the batch input, and its dims of a multiple of the batch size ({self.B}) do not say which of "
                    "its entries belong to which sample (blocks of consecutive entries, or rounds of the batch?). "
                    "Pass per-sample tensors with a dim of exactly the batch size, laid out so that the model uses "
                    "them per sample, and tensors shared by the batch as buffers or attributes of the model")
            layout = exact[0]
            self._relate(node, layout)
            self.seeds[node] = layout
            self.assumed[node] = layout

    def _batch_input_is_unambiguous(self, ctx, candidates: dict) -> None:
        """batch_arg not given: the batch input was taken as the first tensor argument. Another argument that could
        have been it (a dim batch_dim, 2 or more entries there) and would cut the data into other samples makes
        that guess a choice between two readings, and the wrong one clips the wrong unit (a (T, d) position table
        passed first, with a position-wise model, lines up with (B, T, d) activations on their dim 1: every
        "sample" would be a position across the batch). Refused, naming both, when such an argument carries
        samples off batch_dim, or is shared while its size on batch_dim divides the batch size and, taken as the
        batch, it lines up with the first argument read in blocks (flattened (B*T,) labels passed before (B, T)
        inputs: the inputs' rows would be coarser samples; a (T,) per-position tensor next to B = k*T samples
        meets them along another dim and is left alone)."""
        d = self.io.batch_dim
        try:
            hint_b = size_hint(self.B, self.env)
        except Exception:  # noqa: BLE001 - no hint: only the data-flow reading below
            hint_b = None
        for node, name in self.names.items():
            val = node.meta.get("val")
            if node is self.io.batch_node or not isinstance(val, torch.Tensor) or val.dim() <= d:
                continue
            layout = self.seeds.get(node)
            off = layout is not None and layout.dim != d
            coarser = False
            if layout is None and hint_b is not None:
                try:
                    hs = size_hint(sym_expr(val.shape[d]), self.env)
                except Exception:  # noqa: BLE001
                    hs = None
                coarser = hs is not None and 2 <= hs < hint_b and hint_b % hs == 0 and self._lines_up_as_batch(
                    node, hs, sympy.Integer(hint_b // hs))
            if not (off or coarser):
                continue
            first = self.names[self.io.batch_node]
            why = (f"carries samples along its dim {layout.dim}, not dim {d}, when `{first}` is the batch" if off else
                   f"has {hs} entries on dim {d}, a divisor of the {hint_b} of `{first}`, and is shared by the "
                   f"samples of `{first}`")
            raise SampleInputError(
                f"flashdp: cannot tell which argument carries the batch: batch_arg is not given, so dpcompile took the "
                f"first tensor argument `{first}` (shape {_shape(self.io.batch_node)}, samples on dim {d}), but "
                f"`{name}` (shape {_shape(node)}) {why}; taken as the batch, `{name}` would cut the data into other "
                "samples, and the wrong reading clips the wrong unit. Pass batch_arg=<the name or position of the "
                "argument whose dim batch_dim indexes the samples> to dpcompile.compile (or the backend's options)")

    def _lines_up_as_batch(self, node: fx.Node, samples: int, k) -> bool:
        """Whether `node`, taken as the batch (its dim batch_dim indexing `samples` samples), lines up with the
        first argument read as k consecutive entries a sample: evidence that it could be the batch with coarser
        samples ((B, T) inputs after (B*T,) labels), rather than a shared tensor whose size happens to divide the
        batch size ((T,) per-position values next to B = k*T samples, which meet the batch along another dim)."""
        d = self.io.batch_dim
        first = {self.io.batch_node: BDim(d, k)}
        try:
            base = BatchDimAnalysis(self.graph, first, sympy.Integer(samples))
            trial = BatchDimAnalysis(self.graph, {**first, node: BDim(d)}, sympy.Integer(samples))
        except Exception:  # noqa: BLE001 - no reading: it may be the batch, so ask (a refusal, never a guess)
            return True
        up, mixes = self._meets(trial, base, self.deps[node])
        return up and not mixes

    def _meets(self, trial: BatchDimAnalysis, base: BatchDimAnalysis, deps: set):
        """(lines up, mixes): an op where values of the input meet other samples and keep them apart; one where
        they meet and seeding the input made the op combine different samples."""
        up = mixes = False
        for n in self.graph.nodes:
            if n.op != "call_function" or n not in deps:
                continue
            ops = n.all_input_nodes
            if not any(a in deps and _carries(trial.state(a)) for a in ops):
                continue
            if not any(a not in deps and _carries(trial.state(a)) for a in ops):
                continue
            s = trial.state(n)
            leaves = list(_flatten_states(s))
            if any(isinstance(x, Mixed) and x.origin is n and not x.unknown for x in leaves):
                if not any(isinstance(x, Mixed) for x in _flatten_states(base.state(n))):
                    mixes = True
            elif any(isinstance(x, BDim) for x in leaves):
                up = True
        return up, mixes

    def _k(self, node: fx.Node, dim: int):
        """The input's size on dim over B: symbolically where it divides, else at this call's sizes."""
        S = sym_expr(node.meta["val"].shape[dim])
        if divides(self.B, S):
            return sympy.cancel(S / self.B)
        return sympy.Integer(size_hint(S, self.env) // size_hint(self.B, self.env))

    def _relate(self, node: fx.Node, layout: BDim) -> None:
        """The input's size along the layout's dim is k * B (as at this call) wherever the graph is used, or it is
        refused."""
        S = sym_expr(node.meta["val"].shape[layout.dim])
        if divides(self.B, S):
            return
        want = self.B * self._k(node, layout.dim)
        if self.env is not None and S.free_symbols:
            if bool(self.env.evaluate_expr(sympy.Eq(S, want))):
                solve_implied_equalities(self.env)
                return
        raise SampleInputError(
            f"flashdp: the input `{self.names[node]}` (shape {_shape(node)}) has {S} entries on dim {layout.dim}, a "
            f"multiple of the batch size ({self.B}) at this call, but never lines up with the samples of the batch "
            "input, so dpcompile cannot tell whether it holds values of each sample (then a reduction over it would "
            "mix samples) or is shared by the batch, and its size there is fixed while the batch size is not. Pass "
            "a tensor shared by the batch as a buffer or attribute of the model (or with a leading 1), and "
            "per-sample tensors laid out so that the model uses them per sample; or name the batch input with "
            "batch_arg")

    def note(self) -> str:
        """For refusals that follow: the inputs taken to carry samples without evidence."""
        if not self.assumed:
            return ""
        parts = [f"`{self.names[n]}` along dim {l.dim}" for n, l in self.assumed.items()]
        return (f" (dpcompile took the input{'s' if len(parts) > 1 else ''} {', '.join(parts)} to carry samples: "
                "its size there is a multiple of the batch size, and it never lines up with the samples of the batch "
                "input to say otherwise. If it is shared by the batch, pass it as a buffer or attribute of the model, "
                "or with a size that is not a multiple of the batch size)")

    def input_sources(self) -> dict:
        return {self.names[n]: l.dim for n, l in self.seeds.items()}

    def refine(self, exc: DPCompileError) -> DPCompileError:
        """exc with note() appended (same type), or exc itself."""
        text = self.note()
        if not text or isinstance(exc, SymbolicLayoutError):  # that one is retried with static sizes, not refused
            return exc
        try:
            return type(exc)(str(exc) + text)
        except Exception:  # noqa: BLE001 - an error type with another constructor: leave it
            return exc


def _carries(state) -> bool:
    return any(isinstance(x, BDim) for x in _flatten_states(state))


def _shape(node: fx.Node) -> str:
    return "(" + ", ".join(str(sym_expr(s)) for s in node.meta["val"].shape) + ")"


def _layout(layout: BDim) -> str:
    return f"dim {layout.dim}" + ("" if layout.inner == 1 else f" in blocks of {layout.inner}")
