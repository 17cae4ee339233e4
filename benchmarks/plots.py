"""Plots of the benchmark results: throughput and peak memory against sequence length and model size.

    python benchmarks/plots.py                                  # benchmarks/results.json -> docs/img/*.png
    python benchmarks/plots.py --results other.json --out-dir /tmp/img

Input: a JSON list of records with at least `workload` ("<model> B=<batch> T=<seq len>", e.g. "gpt2-small B=8
T=1024"), `mode`, `tokens_per_s`, `peak_mem_gib`, `throughput_ratio`, `memory_ratio` and `gpu`. Where a (gpu,
workload, mode) was measured several times, the last record in the file counts. Written (only where the data has
that many points; a curve needs two x values):
- bench_by_mode.png: throughput and memory of every mode relative to non-DP compiled, per workload (bars);
- throughput_vs_seq_len.png / memory_vs_seq_len.png: one panel per (gpu, model, B), one line per mode;
- throughput_vs_model_size.png / memory_vs_model_size.png: one panel per (gpu, B, T), one line per mode.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE_ORDER = ["tiny", "mini", "small", "base", "medium", "large", "xl", "1b", "3b", "7b", "8b", "13b"]


def parse_workload(workload: str) -> dict:
    """"gpt2-small B=8 T=1024" -> {"model": "gpt2-small", "family": "gpt2", "size": "small", "B": 8, "T": 1024}."""
    model = workload.split()[0] if workload.split() else workload
    b = re.search(r"\bB=(\d+)", workload)
    t = re.search(r"\bT=(\d+)", workload)
    family, _, size = model.rpartition("-")
    return {"model": model, "family": family or model, "size": size if family else model,
            "B": int(b.group(1)) if b else None, "T": int(t.group(1)) if t else None}


def _size_key(size: str, params=None):
    if params:
        return (0, float(params), size)
    s = size.lower()
    return (1, SIZE_ORDER.index(s), s) if s in SIZE_ORDER else (2, 0, s)


def latest(records: list) -> list:
    """One record per (gpu, workload, mode): the last one in the file."""
    out: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in records:
        if not {"workload", "mode", "tokens_per_s", "peak_mem_gib"} <= set(r):
            continue
        if r.get("baseline", "non-DP compiled") != "non-DP compiled":  # e.g. MemArc rows, relative to dp-full
            continue
        key = (r.get("gpu", "?"), r["workload"], r["mode"])
        out.pop(key, None)
        out[key] = {**r, **parse_workload(r["workload"])}
    return list(out.values())


def _modes(rows):
    seen = []
    for r in rows:
        if r["mode"] not in seen:
            seen.append(r["mode"])
    return seen


def _short_gpu(gpu: str) -> str:
    return gpu.replace("NVIDIA ", "").replace(" HBM3", "")


def plot_by_mode(rows, out_dir: Path, plt) -> Path | None:
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("gpu", "?"), r["workload"])].append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 0.5 + 0.45 * max(len(g) for g in groups.values())
                                                       * len(groups) + 1.2 * len(groups)), squeeze=False)
    for ax_row, ((gpu, workload), rs) in zip(axes, groups.items()):
        names = [r["mode"] for r in rs]
        for ax, key, label in ((ax_row[0], "throughput_ratio", "throughput / non-DP compiled"),
                               (ax_row[1], "memory_ratio", "peak memory / non-DP compiled")):
            vals = [r.get(key, float("nan")) for r in rs]
            colors = ["#888888" if n.startswith("non-DP") else "#1f77b4" for n in names]
            bars = ax.barh(range(len(rs)), vals, color=colors)
            ax.set_yticks(range(len(rs)), names, fontsize=8)
            ax.invert_yaxis()
            ax.axvline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xlabel(label)
            ax.set_title(f"{workload} ({_short_gpu(gpu)})", fontsize=9)
            for b, v in zip(bars, vals):
                ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.2f}x", va="center", fontsize=7)
            ax.set_xlim(0, max([v for v in vals if v == v] + [1.0]) * 1.2)
    fig.tight_layout()
    path = out_dir / "bench_by_mode.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_against(rows, axis: str, out_dir: Path, plt) -> list:
    """axis "T" (sequence length) or "size" (model size); one panel per fixed setting of the other keys."""
    fixed = ("gpu", "model", "B") if axis == "T" else ("gpu", "family", "B", "T")
    panels = defaultdict(list)
    for r in rows:
        if r.get(axis) is None:
            continue
        panels[tuple(r.get(k) for k in fixed)].append(r)
    panels = {k: v for k, v in panels.items() if len({r[axis] for r in v}) >= 2}
    if not panels:
        return []
    written = []
    name = "seq_len" if axis == "T" else "model_size"
    colors = {m: f"C{i % 10}" for i, m in enumerate(_modes(rows))}  # one colour per mode in every panel
    for metric, ylabel in (("tokens_per_s", "tokens / s"), ("peak_mem_gib", "peak memory (GiB)")):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (key, rs) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0]))):
            if axis == "T":
                xs = sorted({r["T"] for r in rs})
                pos = {x: x for x in xs}
            else:
                xs = sorted({r["size"] for r in rs}, key=lambda s: _size_key(
                    s, next((r.get("params") for r in rs if r["size"] == s), None)))
                pos = {x: i for i, x in enumerate(xs)}
            for mode in _modes(rs):
                pts = sorted((pos[r[axis]], r[metric]) for r in rs if r["mode"] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[mode],
                            ls="--" if mode.startswith("non-DP") else "-", label=mode)
            if axis == "T":
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.set_xlabel("sequence length T")
            else:
                ax.set_xticks(range(len(xs)), xs)
                ax.set_xlabel("model size")
            ax.set_ylabel(ylabel)
            ax.set_title(" ".join(f"{k}={v}" if k in ("B", "T") else str(_short_gpu(str(v)))
                                  for k, v in zip(fixed, key)), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{'throughput' if metric == 'tokens_per_s' else 'memory'}_vs_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results.json"), help="JSON list of benchmark records")
    ap.add_argument("--out-dir", default=str(HERE.parent / "docs" / "img"), help="where the PNGs go")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks/plots.py needs matplotlib: pip install matplotlib (or pip install -e '.[plots]')",
              file=sys.stderr)
        return 2
    records = json.loads(Path(args.results).read_text())
    if not isinstance(records, list):
        print(f"{args.results}: expected a JSON list of records", file=sys.stderr)
        return 2
    rows = latest(records)
    if not rows:
        print(f"{args.results}: no record has workload, mode, tokens_per_s and peak_mem_gib", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [p for p in [plot_by_mode(rows, out_dir, plt)] if p]
    written += plot_against(rows, "T", out_dir, plt)
    written += plot_against(rows, "size", out_dir, plt)
    workloads = sorted({r["workload"] for r in rows})
    print(f"{len(rows)} results ({len(workloads)} workloads, {len(_modes(rows))} modes) -> "
          + ", ".join(str(p) for p in written))
    if len({r["T"] for r in rows}) < 2:
        print("  (one sequence length only: no curve against T yet)")
    if len({r["size"] for r in rows}) < 2:
        print("  (one model size only: no curve against model size yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
