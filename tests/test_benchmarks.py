"""The benchmark scripts' pure parts (benchmarks/ is not a package: its files are imported as the scripts import
each other, with benchmarks/ on sys.path): the harness's process driver, merging runs, the table, the plots.
Nothing here needs a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)


def test_the_harness_is_not_in_the_package():
    """Issue 20: the harness, its models and its merge tool are in benchmarks/, not in the installed package."""
    assert importlib.util.find_spec("dpcompile.bench") is None
    import harness
    import model_zoo

    assert harness.build_model is model_zoo.build_model
    assert os.path.dirname(os.path.abspath(harness.__file__)) == BENCHMARKS


def test_the_table_shows_ratios_and_failures():
    from merge import add_ratios, table

    rows = add_ratios([dict(workload="w", mode="non-DP compiled", tokens_per_s=2000.0, peak_mem_gib=2.0),
                       dict(workload="w", mode="flashdp flat", tokens_per_s=1000.0, peak_mem_gib=3.0,
                            compile_s=41.25),
                       dict(workload="w", mode="opacus ghost", error="out of memory")], {"gpu": "X"})
    assert rows[1]["throughput_ratio"] == 0.5 and rows[1]["memory_ratio"] == 1.5 and rows[2]["gpu"] == "X"
    text = table(rows).splitlines()
    assert text[3].startswith("| w | flashdp flat | 1.0k | 0.50 | 3.00 | 1.50 |") and text[3].endswith("| 41.2 |")
    assert text[4] == "| w | opacus ghost | failed: out of memory | | | | | | |"


def test_benchmark_plots_cope_with_one_workload_and_with_many(tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    def rec(workload, mode, tps, mem):
        return dict(workload=workload, mode=mode, tokens_per_s=tps, peak_mem_gib=mem, throughput_ratio=tps / 100,
                    memory_ratio=mem / 5, gpu="GPU X")

    one = [rec("gpt2-small B=8 T=1024", "non-DP compiled", 100, 5), rec("gpt2-small B=8 T=1024", "flashdp flat", 40, 6)]
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert plots.main(["--results", str(tmp_path / "one.json"), "--out-dir", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bench_by_mode.png"]
    many = one + [rec(f"gpt2-{s} B=8 T={T}", m, 50, 5) for s in ("small", "medium") for T in (256, 512)
                  for m in ("non-DP compiled", "flashdp flat")]
    (tmp_path / "many.json").write_text(json.dumps(many))
    assert plots.main(["--results", str(tmp_path / "many.json"), "--out-dir", str(tmp_path / "b")]) == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} == {
        "bench_by_mode.png", "throughput_vs_seq_len.png", "memory_vs_seq_len.png",
        "throughput_vs_model_size.png", "memory_vs_model_size.png"}
    assert plots.parse_workload("gpt2-medium B=4 T=512") == {"model": "gpt2-medium", "family": "gpt2",
                                                             "size": "medium", "B": 4, "T": 512}


def test_bench_merge_fills_ratios_across_calls_and_keeps_a_calls_own(tmp_path):
    """Modes of one workload run in separate calls (each alone on the GPU): merging them computes the DP rows'
    ratios against the merged baseline; a ratio a call computed against its own baseline is kept."""
    import merge

    w = "llama-1.1b B=2 T=16384"
    alone = [dict(workload=w, mode="flashdp per_layer", tokens_per_s=39.0, peak_mem_gib=70.0)]
    base = [dict(workload=w, mode="non-DP compiled", tokens_per_s=40.0, peak_mem_gib=69.0)]
    own = [dict(workload=w, mode="flashdp flat", tokens_per_s=30.0, peak_mem_gib=69.0, throughput_ratio=0.5,
                memory_ratio=1.0)]
    paths = []
    for i, rows in enumerate((alone, base, own)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(rows))
    merge.merge([str(p) for p in paths], "t", "", str(tmp_path / "r.json"), str(tmp_path / "r.md"))
    got = {r["mode"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert got["flashdp per_layer"]["throughput_ratio"] == pytest.approx(39 / 40)
    assert got["flashdp per_layer"]["memory_ratio"] == pytest.approx(70 / 69)
    assert got["flashdp flat"]["throughput_ratio"] == 0.5 and got["non-DP compiled"]["throughput_ratio"] == 1.0
    assert "| 0.97 |" in (tmp_path / "r.md").read_text()
    # the command line (`python benchmarks/merge.py FILE... --title T`) appends a second section
    assert merge.main([str(paths[1]), "--title", "second", "--results-json", str(tmp_path / "r.json"),
                       "--results-md", str(tmp_path / "r.md")]) == 0
    assert len(json.loads((tmp_path / "r.json").read_text())) == 4
    assert (tmp_path / "r.md").read_text().count("\n## ") == 2 and "— second" in (tmp_path / "r.md").read_text()


def test_bench_parallel_warmup_times_one_mode_at_a_time(tmp_path):
    """--parallel: every mode compiles at once, but the timed steps never overlap; a mode that dies before it is
    warm becomes an error row, not a hang."""
    import harness

    log = tmp_path / "log"
    child = (
        "import json, sys, time\n"
        "mode, log = sys.argv[1], sys.argv[2]\n"
        "if mode == 'broken': raise SystemExit('compile failed: boom')\n"
        "print('some library chatter', flush=True)\n"
        "print('READY', flush=True)\n"
        "assert sys.stdin.readline().strip() == 'GO'\n"
        "open(log, 'a').write(f'start {mode}\\n'); time.sleep(0.2); open(log, 'a').write(f'end {mode}\\n')\n"
        "print(json.dumps({'tokens_per_s': 1.0, 'peak_mem_gib': 1.0}), flush=True)\n")

    def command(workload, mode, profile, gated):
        assert gated
        return [sys.executable, "-c", child, mode, str(log)]

    rows = harness._run_batch("w", ["a", "broken", "b"], False, 60.0, command=command)
    assert [r["mode"] for r in rows] == ["a", "broken", "b"]
    assert "boom" in rows[1]["error"] and "tokens_per_s" in rows[0] and "tokens_per_s" in rows[2]
    assert log.read_text().split("\n")[:4] == ["start a", "end a", "start b", "end b"]
    assert harness._batches(["opacus ghost", "flashdp flat", "non-DP compiled", "flashdp per_layer", "x"], 2) == [
        ["non-DP compiled", "flashdp flat"], ["flashdp per_layer", "x"], ["opacus ghost"]]
