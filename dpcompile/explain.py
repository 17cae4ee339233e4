"""`dpcompile.explain`: the plan for every trainable parameter (group, threshold, site pattern, strategy, and for
linear weight sites the predicted cost of each strategy in microseconds per sample on the planner's device model)."""
from __future__ import annotations

import torch

from . import backend as _backend


class Plan:
    def __init__(self, rows: list, batch_inputs: dict, options):
        self.rows = rows
        self.batch_inputs = batch_inputs
        self.options = options

    def __str__(self) -> str:
        head = ("parameter", "shape", "group", "C_g", "pattern", "strategy", "predicted us/sample")
        table = [head] + [
            (r["parameter"], "x".join(map(str, r["shape"])) or "scalar", r["group"] or "(root)",
             f"{r['threshold']:.4g}" if isinstance(r["threshold"], (int, float)) else str(r["threshold"]), r["pattern"], r["strategy"] + (" chunked" if r.get("chunked") else "") + (" (forced)" if r.get("forced") else ""),
             _costs(r)) for r in self.rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        o = self.options
        lines.append("")
        lines.append(f"clipping={o.clipping!r} clip_fn={o.clip_fn!r} loss_reduction={o.loss_reduction!r} "
                     f"batch inputs: {', '.join(f'{s} dim {d}' for s, d in self.batch_inputs.items())}")
        if o.uses_randomized():
            lines.append(f"randomized norms: probes={o.probes} probe_variant={o.probe_variant!r} (estimated "
                         "per-sample norms: the privacy accounting changes, docs/randomized.md)")
        return "\n".join(lines)

    __repr__ = __str__

    def predicted_us_per_sample(self) -> float:
        """Sum over linear sites of the chosen strategy's predicted cost (microseconds per sample)."""
        return sum(r["cost_us_per_sample"][r["strategy"]] for r in self.rows if r.get("cost_us_per_sample"))


def _costs(row) -> str:
    costs = row.get("cost_us_per_sample") or {}
    return " ".join(f"{k}={v:.3g}{'*' if k == row['strategy'] else ''}" for k, v in costs.items()) or "-"


def explain(model, example_inputs, **options) -> Plan:
    """Compile `model` (an nn.Module, or a function of the inputs that returns the loss) with the eager flashdp
    backend on `example_inputs` (a tensor or a tuple of them), run one forward, and return the plan."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    torch._dynamo.reset()
    ctxs: list = []
    _backend._CONTEXT_LISTENERS.append(ctxs)
    _backend._EXPLAINING[0] = True
    try:
        compiled = torch.compile(model, backend="flashdp_eager", options=options, fullgraph=True)
        with torch.enable_grad():
            compiled(*example_inputs)
    finally:
        _backend._CONTEXT_LISTENERS.remove(ctxs)
        _backend._EXPLAINING[0] = False
    rows, batch_inputs = [], {}
    for ctx in ctxs:
        rows.extend(ctx.report)
        batch_inputs.update(ctx.input_sources)
    opts = ctxs[-1].options if ctxs else None
    torch._dynamo.reset()
    return Plan(rows, batch_inputs, opts)
