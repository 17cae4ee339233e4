"""Errors raised by dpcompile. All derive from DPCompileError."""


class DPCompileError(RuntimeError):
    """Base class: dpcompile refused to produce a gradient it cannot prove private."""


class OptionsError(DPCompileError, ValueError):
    """An unknown or malformed option."""


class LossReductionError(OptionsError):
    """The loss the graph computes is not the declared loss_reduction of per-sample terms (a sum declared "mean",
    a mean declared "sum"), or its form cannot be read from the graph."""


class UnsupportedGradientError(DPCompileError):
    """A trainable parameter's gradient goes through an op the pass cannot put on a clipped path."""


class SampleMixingError(DPCompileError):
    """The graph combines different samples (BatchNorm statistics, in-batch losses, batch-wide normalisers)."""


class SampleInputError(DPCompileError):
    """An input of the compiled call whose samples dpcompile cannot place: it lines up with the batch in several
    layouts, or it may hold values of each sample but its size cannot follow the batch size."""


class CoverageError(DPCompileError):
    """A trainable parameter would have received a gradient that was not clipped."""


class SymbolicLayoutError(UnsupportedGradientError):
    """A sample layout that cannot be split while the batch size and another size are both symbolic.
    dpcompile.compile catches it and recompiles that shape with static non-batch sizes."""


class GraphBreakError(DPCompileError):
    """The model cannot be traced into one graph (a graph break under fullgraph=True): one sample's gradient would
    be clipped in pieces, each to its own bound."""
