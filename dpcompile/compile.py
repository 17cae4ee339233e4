"""`dpcompile.compile`: torch.compile with the flashdp backend, one graph for every batch size >= 2 and every
sequence length.

Graphs per compiled model (docs/gradient-contract.md, "Batch sizes and sequence lengths"): the batch size B (the
batch dim of the batch input; maybe-dynamic dims of the other inputs whose size is a multiple of B) and the other
dims of those inputs (the sequence length T) are marked dynamic before every call, so the
marking is the same in a fresh process and after other models compiled (Dynamo's automatic dynamic would otherwise
make a dim dynamic only once it has seen two values of it). The DP pass adds no guard on B or T, so the graphs are
the classes of sizes that Dynamo and the model's own code tell apart: B in {0, 1, >= 2} (Dynamo specializes 0 and
1) times the length classes of the model (T = 1 is specialized too; a causal LM loss over T - 1 shifted targets
also tells T = 2 apart).
"""
from __future__ import annotations

import itertools
import sys
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from .errors import SymbolicLayoutError
from .graph_breaks import explain_graph_break
from .hf_compat import disable_hub_kernels, refuse_labels_loss
from .options import DPOptions, infer_batch_input


class DPCompiled:
    """A compiled model that marks the batch dim dynamic before each call, so that Poisson batches of any size
    >= 2 share one graph (sizes 0 and 1 get their own graphs, as Dynamo specializes them), and, with
    dynamic_seq=True, the other dims of every sample-carrying input too (sequence lengths, padded per batch).

    A sample layout the pass cannot split while those dims are symbolic (SymbolicLayoutError) is recompiled with
    them static: from then on this model gets one graph per length (a warning says so once)."""

    def __init__(self, model: nn.Module, compiled, options: DPOptions, dynamic_seq: bool = True):
        self.module = model
        self._compiled = compiled
        self.options = options
        self.dynamic_seq = dynamic_seq
        self._wide = False  # dynamic_seq=False: mark every dim of a multiple of B after Dynamo needed one more

    def _batch_tensor(self, args, kwargs):
        arg = self.options.batch_arg
        if isinstance(arg, str):
            return kwargs.get(arg)
        if isinstance(arg, int):
            return args[arg] if arg < len(args) else None
        d = self.options.batch_dim
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > d]
        return tensors[infer_batch_input([t.shape[d] for t in tensors], d)] if tensors else None

    def _candidate_inputs(self, args, kwargs):
        """(the batch tensor, [(another tensor input, its dims whose size is a multiple of the batch size)]): the
        inputs that may carry samples, in whatever layout ((B*T,) labels, a (T, B) mask, (B,) weights next to a
        batch_dim=1 input). Which of them do, and along which dim, the pass decides by data flow
        (passes/sample_inputs.py); here they only get their sizes symbolic, so that Dynamo can relate them to B."""
        x = self._batch_tensor(args, kwargs)
        d = self.options.batch_dim
        if not (isinstance(x, torch.Tensor) and x.dim() > d):
            return None, []
        B = x.shape[d]
        # with static lengths, only the batch dim (B there) and dims of B times a length of the batch input ((B*T,)
        # labels) that is not itself one of its lengths: a length that equals B or B*d would be marked at some calls
        # and not at others (a graph more each time). A layout these miss ((T, B) masks, (B,) weights next to a
        # batch_dim=1 input) makes Dynamo fix B: then every dim of a multiple of B is marked (_wide), from then on
        lengths = {s for i, s in enumerate(x.shape) if i != d}
        flat = {B * s for s in lengths} - lengths
        out = []
        for t in list(args) + list(kwargs.values()):
            if not isinstance(t, torch.Tensor) or t is x:
                continue
            if B >= 2 and (self.dynamic_seq or self._wide):
                dims = [i for i in range(t.dim()) if t.shape[i] >= B and t.shape[i] % B == 0]
            elif B >= 2:
                dims = [i for i in range(t.dim()) if (i == d and t.shape[i] == B) or t.shape[i] in flat]
            else:  # every size is a multiple of 0 or 1: the inputs laid out like the batch input (targets, masks)
                dims = [d] if t.dim() > d and t.shape[d] == B else []
            if dims:
                out.append((t, dims))
        return x, out

    def _mark(self, args, kwargs) -> None:
        """The batch dim of the batch input: dynamic (the user's batch_dim; B >= 2, as Dynamo specializes 0 and 1).
        Dims of other inputs whose size is a multiple of B: maybe dynamic (never an error if the model fixes
        them). The other dims of the batch input and of those inputs: maybe dynamic with dynamic_seq, else static.
        No dim of an input that has none of the batch size is touched."""
        x, others = self._candidate_inputs(args, kwargs)
        if x is None:
            return
        d = self.options.batch_dim
        if x.shape[d] >= 2:
            torch._dynamo.mark_dynamic(x, d)
        self._mark_rest(x, [d])
        for t, dims in others:
            if x.shape[d] >= 2:
                torch._dynamo.maybe_mark_dynamic(t, dims)
            self._mark_rest(t, dims)

    def _mark_rest(self, t: torch.Tensor, batch_dims: list) -> None:
        others = [i for i in range(t.dim()) if i not in batch_dims]
        if self.dynamic_seq:
            # maybe_: a dim the model fixes (a feature width meeting a weight) is specialized without an error
            torch._dynamo.maybe_mark_dynamic(t, others)
        elif others:
            weak = getattr(t, "_dynamo_weak_dynamic_indices", None)
            if weak is not None:  # a mark left by an earlier call on the same tensor outranks mark_static
                weak.difference_update(others)
            torch._dynamo.mark_static(t, others)

    def __call__(self, *args, **kwargs):
        refuse_labels_loss(self.module, args, kwargs)  # before Dynamo trips on transformers' logging
        self._mark(args, kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # Dynamo wraps backend errors (BackendCompilerFailed)
            graph_break = explain_graph_break(exc, self.module)
            if graph_break is not None:
                raise graph_break from exc
            if not self._wide and not self.dynamic_seq and _caused_by(exc, ConstraintViolationError) is not None:
                self._wide = True  # an input whose size is k*B for another k: its dim must follow B too
                self._mark(args, kwargs)
                return self._compiled(*args, **kwargs)
            if not (self.dynamic_seq and _caused_by(exc, SymbolicLayoutError)):
                raise
            warnings.warn(
                f"dpcompile: {_caused_by(exc, SymbolicLayoutError)}. Recompiling with the sequence dims static: "
                "from now on this model compiles one graph per sequence length (pad batches to a few lengths, "
                "or pass dynamic_seq=False to dpcompile.compile to say so up front)", stacklevel=2)
            self.dynamic_seq = False
            self._mark(args, kwargs)
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def _caused_by(exc: BaseException, kind: type):
    """The `kind` exception among exc's causes (Dynamo wraps backend errors), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def compile(model: nn.Module, *, backend: str = "flashdp", fullgraph: bool = True, dynamic_seq: bool = True,
            mode: Optional[str] = None, **options) -> DPCompiled:
    """Compile `model` for DP training. `options` are the flashdp options (max_grad_norm, clipping, clip_fn,
    loss_reduction, batch_arg, batch_dim). fullgraph=True by default: a graph break could let a parameter's
    gradient escape the clipped path.

    dynamic_seq: True (default) compiles the dims of the sample-carrying inputs other than the batch dim (sequence
    length, image size) as dynamic: one graph serves every length. False keeps them static: one graph per length
    (each compiled for its own sizes).

    mode: a torch.compile mode for Inductor's code generation: None / "default", "reduce-overhead" (CUDA graphs:
    the step's kernels replayed from one graph, no launch overhead; one recording per distinct input shape),
    "max-autotune" or "max-autotune-no-cudagraphs". Not with randomized norms under CUDA graphs (refused)."""
    if not isinstance(dynamic_seq, bool):
        raise TypeError(f"dpcompile.compile: dynamic_seq must be True or False, got {dynamic_seq!r}")
    opts = DPOptions.parse(options)
    backend_options = opts.as_dict()
    if mode is not None and mode != "default":
        from .backend import mode_config_patches

        mode_config_patches(mode)  # an unknown mode is refused here, not at the first call
        backend_options["mode"] = mode
    if _holds_transformers_model(model):  # compiled directly: no opaque hub kernels in the graph
        disable_hub_kernels(model)
    compiled = torch.compile(_own_code_object(model), backend=backend, options=backend_options, fullgraph=fullgraph)
    return DPCompiled(model, compiled, opts, dynamic_seq=dynamic_seq)


def _holds_transformers_model(model: nn.Module) -> bool:
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and any(isinstance(m, modeling_utils.PreTrainedModel) for m in model.modules())


_COMPILES = itertools.count()


def _own_code_object(self: nn.Module):
    """`self(*args, **kwargs)` through a function whose code object belongs to this compile alone. Dynamo keeps
    its graphs, and counts them against its recompile limit (8), per code object: compiled directly, every model
    whose forward is one class's (LossModule, CausalLMLoss around different models) would share one count, and
    the third model of a process could fail on the graphs of the first two. The module is named `self` so that
    Dynamo's sources read `L['self'].…` as when the module itself is compiled (the backend names tensors by them)."""
    def dp_forward(*args, **kwargs):
        return self(*args, **kwargs)

    dp_forward.__code__ = dp_forward.__code__.replace(co_name=f"dp_forward_{next(_COMPILES)}")
    return dp_forward
