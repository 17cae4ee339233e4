"""docs/img/results_ppl_vs_epsilon.png: held-out perplexity after DP fine-tuning against epsilon, with the
non-private run (on CPU of the same recipe; on the GPU the non-private default) and the perplexity before training,
for the CPU and the GPU defaults of `dpcompile train` (its own runs) and the earlier GPU default (recipe search)
(docs/results.md).

    python benchmarks/plot_results.py            # reads benchmarks/results_runs.jsonl and recipe_search.jsonl

results_runs.jsonl: one `dpcompile train` run per line ({"setting", "command", "report": dp_report.json}).
recipe_search.jsonl: benchmarks/cpu_recipe_search.py records (the GPU rows: one compiled model, several recipes).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cli_points(path: Path) -> dict:
    """{setting: [(epsilon or inf, perplexity after, perplexity before)]} from the CLI runs."""
    out: dict = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rep = r["report"]
        eps = rep["epsilon"] if rep["private"] else math.inf
        out.setdefault(r["setting"], {})[round(eps, 2)] = (eps, rep["perplexity_after"], rep["perplexity_before"])
    return {k: list(v.values()) for k, v in out.items()}  # a run repeated (seeded: the same numbers) counts once


def gpu_points(path: Path, seq_len: int, recipe: dict, clipping: str, no_dp_recipe: dict) -> list:
    """[(epsilon or inf, perplexity after, before)] of a GPU recipe on windows of seq_len tokens: DP runs of `recipe`
    at each epsilon, and the non-private run of `no_dp_recipe` (each mode's own default, cli.PROFILES)."""
    pts = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["seq_len"] != seq_len or r["train"] != "blocks":
            continue
        base = {k: v for k, v in r["recipe"].items() if k != "eps"}
        if r.get("dp") and r.get("clipping") == clipping and base == recipe:
            pts.append((r["dp"]["epsilon"], r["dp"]["ppl"], r["ppl_before"]))
        if r.get("no_dp") and base == no_dp_recipe:
            pts.append((math.inf, r["no_dp"]["ppl"], r["ppl_before"]))
    return sorted(set(pts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(HERE / "results_runs.jsonl"))
    ap.add_argument("--search", default=str(HERE / "recipe_search.jsonl"))
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "img" / "results_ppl_vs_epsilon.png"))
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {f"dpcompile train\n({k})": v for k, v in cli_points(Path(args.runs)).items()}
    series["GPU, earlier default (256-token windows, B=256;\nDP 6 epochs, non-private 3)"] = gpu_points(
        Path(args.search), 256, {"B": 256, "steps": 134, "lr": 0.0007}, "flat", {"B": 256, "steps": 67, "lr": 0.0003})
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], series.items()):
        private = sorted((e, p) for e, p, _ in pts if math.isfinite(e))
        nodp = [p for e, p, _ in pts if not math.isfinite(e)]
        before = pts[0][2] if pts else float("nan")
        ax.plot([e for e, _ in private], [p for _, p in private], "o-", label="DP (dpcompile)")
        for p in nodp:
            ax.axhline(p, color="tab:green", ls="--", label="no privacy (its own default)")
        ax.axhline(before, color="gray", ls=":", label="before fine-tuning")
        ax.set_xlim(0, 10)
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
