"""A model that Dynamo cannot trace into one graph: say which module and which line, and why one graph matters.

dpcompile compiles with fullgraph=True: a graph break would split the model into graphs that each clip their
own part of one sample's gradient, so the sample's whole gradient could exceed its bound (docs/gradient-contract.md,
"one sample, one bound"). Dynamo's own message names the construct; this one adds the module path and the line
in the user's code, and the ways out.
"""
from __future__ import annotations

import inspect
import linecache
from typing import Optional

from torch import nn

from .errors import GraphBreakError


def _forward_span(module: nn.Module) -> Optional[tuple]:
    fwd = getattr(type(module), "forward", None)
    try:  # transformers decorates forward (can_return_tuple, auto_docstring, ...): the source is the wrapped one's
        fwd = inspect.unwrap(fwd) if fwd is not None else None
    except ValueError:  # a __wrapped__ cycle
        pass
    code = getattr(fwd, "__code__", None)
    if code is None:
        return None
    try:
        lines, first = inspect.getsourcelines(fwd)
    except (OSError, TypeError):
        return None
    return code.co_filename, first, first + len(lines) - 1


def _module_at(model: nn.Module, filename: str, lineno: int) -> Optional[tuple]:
    """(path, module) of a submodule whose forward holds `filename:lineno`; the deepest such path."""
    best = None
    for path, m in model.named_modules():
        span = _forward_span(m)
        if span and span[0] == filename and span[1] <= lineno <= span[2]:
            if best is None or path.count(".") > best[0].count("."):
                best = (path, m)
    return best


def explain_graph_break(exc: BaseException, model: nn.Module) -> Optional[GraphBreakError]:
    """A GraphBreakError for Dynamo's `Unsupported` under fullgraph, or None for any other exception."""
    from torch._dynamo.exc import Unsupported

    if not isinstance(exc, Unsupported):
        return None
    frames = list(getattr(exc, "real_stack", None) or [])
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "in the compiled call"
    for frame in reversed(frames):  # innermost first: the line that broke the graph
        found = _module_at(model, frame.filename, frame.lineno)
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        if found is not None:
            path, m = found
            name = f"`{path}` ({type(m).__name__})" if path else f"the model ({type(m).__name__})"
            where = f"in {name}, {frame.filename} line {frame.lineno}: `{line}`"
            break
        if frame is frames[-1]:
            where = f"at {frame.filename} line {frame.lineno}: `{line}`"
    return GraphBreakError(
        f"flashdp: Dynamo cannot trace the model into one graph {where} ({reason}). dpcompile needs every use of "
        "the trainable parameters in one graph: a graph break would clip one sample's gradient in pieces, each to "
        "its own bound. Make that code traceable (no data-dependent Python branching, printing or .item() in "
        "forward; torch.where / torch.cond instead of `if tensor`), or move it out of the compiled module. "
        "Dynamo's own explanation is the exception this one was raised from.")
