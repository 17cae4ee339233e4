"""Per-parameter strategy and the rows `dpcompile.explain` prints.

Strategies:
  fused-linear / fused-rows / fused-embedding  one site whose norm and clipped sum come from its own ops
  materialize                                  per-sample gradients formed (B x numel), then norm and sum;
                                               used for several uses of one parameter (tied weights), bmm and
                                               conv sites, scatters after other ops, and B == 1 graphs
  zero                                         empty batch: the clipped sum is zero
The cost-model choice between ghost / direct / single-pass kernels per site lives in the kernel layer.
"""
from __future__ import annotations

import operator


def strategy(pg) -> str:
    return f"fused-{pg.contributions[0].site.kind}" if pg.fused else "materialize"


def pattern(pg) -> str:
    parts = []
    for c in pg.contributions:
        op = c.site.node.args[0] if c.site.node.target is operator.getitem else c.site.node
        name = getattr(op.target, "__name__", str(op.target))
        chain = [getattr(s.node.target, "__name__", str(s.node.target)).split(".")[0] for s in c.chain]
        tail = ("->" + "->".join(dict.fromkeys(chain))) if chain else ""
        parts.append(f"{c.site.kind}({name}){tail}")
    return " + ".join(parts)


def plan_rows(params, ctx, empty: bool = False) -> list:
    rows = []
    for info, pg in params:
        rows.append({
            "parameter": info.name,
            "group": info.group,
            "threshold": ctx.thresholds[info.group],
            "pattern": "-" if empty else pattern(pg),
            "strategy": "zero" if empty else strategy(pg),
            "shape": tuple(pg.placeholder.meta["val"].shape),
        })
    return rows
