"""Coverage: every trainable parameter's gradient output comes from a clipped sum, or the pass fails."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..codegen.registry import ops_with_role
from ..errors import CoverageError
from .sites import site_kind
from .sites import mapped


def clipped_sum_ops() -> set:
    """The ops registered with the role "clipped_sum" (codegen/registry.py): an op in the graph was defined, so
    registered, so it is here."""
    return ops_with_role("clipped_sum")


def _reaches_clipped_sum(node: fx.Node) -> bool:
    """The output is a clipped sum up to reshapes/casts/scalings of it (or zeros for an empty batch)."""
    summing = clipped_sum_ops()
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.target in summing:
            return True
        if n.op == "placeholder":
            return False
        # sizes are not values: a view's symbolic shape (sym_size of an input) carries no gradient
        inputs = [a for a in n.all_input_nodes if not _is_size(a)]
        if not inputs and n.target is torch.ops.aten.full.default and n.args[1] == 0:
            return True
        stack.extend(inputs)
    return False


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, int))


def verify_coverage(graph: fx.Graph, ctx, params: list) -> None:
    outs = list(graph.output_node().args[0])
    for info, pg in params:
        out = outs[pg.out_pos]
        if not _reaches_clipped_sum(out):
            raise CoverageError(
                f"parameter `{info.name}` would get a gradient that is not a clipped sum (output `{out}`); "
                "refusing to produce a non-private gradient"
            )
        # the unclipped contributions must be gone: no path from the output back to an original site
        for c in pg.contributions:
            if site_kind(c.site.kind).keeps_node:
                continue
            for original in mapped.originals(c.site) + list(c.site.info.get("originals", ())):
                if _depends_on(out, original):
                    raise CoverageError(
                        f"parameter `{info.name}`: the non-private gradient `{original.name}` still feeds the output"
                    )


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    """Whether a path leads from `target` to `node`. Walked forward from `target` (a replaced gradient: after the
    rewrite it has few users or none), not back from `node`, whose ancestors are most of the graph under flat
    clipping: one walk per site was quadratic in the model's size."""
    seen, stack = set(), [target]
    while stack:
        n = stack.pop()
        if n is node:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return False
