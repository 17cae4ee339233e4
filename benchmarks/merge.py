"""Results of the benchmark harness (harness.py): ratios to the non-DP baseline, the markdown table, and merging
runs into this directory's results.json and RESULTS.md.

    python benchmarks/merge.py DIR/results.json [DIR2/results.json ...] --title "..." [--note "..."]

(`python benchmarks/harness.py --merge FILE... --title ...` does the same.) Each FILE is a results.json that the
harness wrote with --out. Their rows are appended to benchmarks/results.json and, as one dated section, to
benchmarks/RESULTS.md. When the modes of one workload ran in separate calls on one machine (each alone on the GPU),
merging them together fills in the ratios of the rows that had no baseline in their own call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_JSON = os.path.join(HERE, "results.json")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def add_ratios(rows: list, info: dict | None = None, only_missing: bool = False) -> list:
    """Ratios to the non-DP compiled row of the same workload among `rows`. only_missing (merging calls that
    each ran some modes of a workload on one machine): keep the ratios a call computed itself."""
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["mode"] == "non-DP compiled"
                     and "tokens_per_s" in b), None)
        if base and "tokens_per_s" in r and not (only_missing and "throughput_ratio" in r):
            r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_mem_gib"] / base["peak_mem_gib"]
        r.update(info or {})
    return rows


def table(rows: list) -> str:
    lines = ["| workload | mode | tok/s | vs non-DP compiled | peak GiB | mem ratio | step ms | host ms | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['tokens_per_s'] / 1e3:.1f}k | "
                         f"{r.get('throughput_ratio', math.nan):.2f} | {r['peak_mem_gib']:.2f} | "
                         f"{r.get('memory_ratio', math.nan):.2f} | {r.get('step_ms', math.nan):.1f} | "
                         f"{r.get('host_ms', math.nan):.1f} | {r.get('compile_s', math.nan):.1f} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | failed: {r['error']} | | | | | | |")
    return "\n".join(lines)


def merge(paths: list, title: str, note: str, results_json: str = RESULTS_JSON, results_md: str = RESULTS_MD) -> None:
    """Append runs (results.json files from the harness's --out) to `results_json` and a dated section of
    `results_md` (by default this directory's results.json and RESULTS.md)."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f))
    for r in rows:
        r.setdefault("note", title)
    add_ratios(rows, only_missing=True)
    existing = []
    if os.path.exists(results_json):
        with open(results_json) as f:
            existing = json.load(f)
    with open(results_json, "w") as f:
        json.dump(existing + rows, f, indent=1)
    first = rows[0] if rows else {}
    head = (f"\n## {first.get('date', '?')} — {first.get('gpu', '?')}, torch {first.get('torch', '?')}, "
            f"triton {first.get('triton', '?')} — {title}\n\n")
    with open(results_md, "a") as f:
        f.write(head + (note + "\n\n" if note else "") + table(rows) + "\n")


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="results.json files written by the harness's --out")
    ap.add_argument("--title", default="benchmark run")
    ap.add_argument("--note", default="")
    ap.add_argument("--results-json", default=RESULTS_JSON, help="the results file to append to")
    ap.add_argument("--results-md", default=RESULTS_MD, help="the markdown file to append a section to")
    args = ap.parse_args(argv)
    merge(args.files, args.title, args.note, args.results_json, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
