"""The stages of `dpcompile train` (dpcompile/cli.py's `train` runs them in order).

    setup = resolve(args, PROFILES, RUN_OPTIONS) # the run's settings (or the resumed run's), --out checked
    model = load_model(setup)                    # model + tokenizer, frozen but the trained blocks
    prior, prior_from = prior_history(setup)     # the DP history the model (or the resumed run) records
    data = load_data(setup, model.tok)           # corpus, training and held-out windows, planned steps
    privacy = plan_privacy(setup, data, prior, prior_from)   # the accountant, sigma for the target
    run = build(setup, model, data, privacy)     # perplexity before, loader, optimizer, the compiled step
    run.restore_and_plan()                       # --resume: the checkpoint's state; the privacy plan
    done, train_s = run.train_loop()             # progress, checkpoints, Ctrl-C
    report, ppl_after, eps_spent = finish(run, done)         # perplexity after, sample, final save
    print_summary(run, report, train_s, ppl_after, eps_spent)

The records the stages pass along (Setup, Model, Data, Privacy) and the resolution of the run's settings are in
train_setup.py; what the run writes and reads besides the model (dp_report.json, the curve, the run record of
--resume, the held-out perplexity, the first step's seconds) in train_report.py.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import compile_cache
from . import data as D
from .cli_common import UsageError, _log, _strategy_option, freeze
from .hf import DP_CHECKPOINT_NAME, CausalLMLoss, load_privacy_history
from .privacy.accounting import PrivacyAccountant, _history_epsilon, get_noise_multiplier
from .train_report import (  # noqa: F401  (train_run.X, as before)
    CURVE_CSV, CURVE_PNG, FIRST_STEP_FILE, REPORT_NAME, RUN_FORMAT, _bar, _first_step_key, _first_step_records,
    _json_safe, _nullcontext, _read_run, first_step_forecast, perplexity, record_first_step, write_curve)
from .train_setup import (  # noqa: F401  (train_run.X, as before)
    Data, Model, Privacy, Setup, _adaptive_run_options, _dir_is_empty, _out_dir, _planned_steps, _resolve_device,
    _resolve_run)


# ---- stages ---------------------------------------------------------------------------------------------------

def resolve(args: argparse.Namespace, profiles: dict, run_options: Sequence[str]) -> Setup:
    """The run's settings, the output directory (refused unless empty, new, the resumed one or --overwrite); seeds
    torch. profiles, run_options: the command's defaults by device type and the options that define a run
    (cli.PROFILES, cli.RUN_OPTIONS)."""
    t_start = time.time()
    explicit = getattr(args, "explicit", None) or set()  # main() fills it in (_explicit_options)
    resumed = _read_run(args.resume) if args.resume else None
    run = _resolve_run(args, explicit, resumed, profiles, run_options)
    setup = Setup(args, run, resumed, torch.device(run["device"]), _out_dir(args), t_start, profiles)
    torch.manual_seed(run["seed"])
    return setup


def load_model(s: Setup) -> Model:
    """The model (the resumed checkpoint's) on the device in training mode, frozen but the trained blocks."""
    run = s.run
    source = s.args.resume if s.resumed is not None else run["model"]
    _log(f"loading model {source} ...")
    model, tok = D.load_model(source, progress=s.progress)
    model.to(s.device).train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    train_layers = run["train_layers"]
    n_train, n_total = freeze(model, train_layers, run["train_embeddings"])
    _log(f"{type(model).__name__}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trained "
         f"({'all blocks' if train_layers in (None, -1) else f'last {train_layers} blocks'}"
         f"{', embeddings too' if run['train_embeddings'] else ', embeddings frozen'}) on {s.device}")
    return Model(model, tok, n_train)


def prior_history(s: Setup) -> tuple[Optional[dict], Optional[str]]:
    """The privacy already spent, and where it is recorded: a resumed run's own history, or the DP history of the
    model's directory."""
    if s.resumed is None and Path(s.run["model"]).is_dir():
        prior = load_privacy_history(s.run["model"])
        return prior, s.run["model"] if prior else None
    if s.resumed is not None:
        return s.extra.get("prior_accountant"), s.extra.get("prior_from")
    return None, None


def load_data(s: Setup, tok) -> Data:
    """The corpus's training and held-out windows, and the steps of the run."""
    run, args = s.run, s.args
    _log(f"loading corpus {run['data']} ...")
    corpus = D.load_corpus(run["data"], encoding=run["encoding"])
    seq_len = run["seq_len"]
    try:
        windows = D.token_windows(corpus.train, tok, seq_len, max_windows=run["max_windows"])
    except D.DataError as err:
        raise D.DataError(f"--data {run['data']}: the training {err}; pass a smaller --seq-len") from None
    held = None
    if run["eval_windows"] > 0:
        try:
            held = D.token_windows(corpus.held_out, tok, seq_len, max_windows=run["eval_windows"])
        except D.DataError:
            _log(f"warning: the held-out text of {run['data']} is shorter than one window of {seq_len} tokens: "
                 "no perplexity (a smaller --seq-len gives some)")
    N = len(windows)
    B = run["batch_size"]
    if B > N:
        raise UsageError(f"--batch-size {B} is larger than the {N} training windows of {seq_len} tokens "
                         f"(pass a smaller --batch-size or --seq-len, or more text)")
    q = B / N
    steps_done = int(s.extra["step"]) if s.resumed is not None else 0
    if s.resumed is not None and args.steps is None and args.epochs is None:
        steps = int(run["steps"])
    else:
        steps = _planned_steps(args, q, s.device.type, s.profiles, s.private)
    if steps <= steps_done:
        raise UsageError(f"--resume {args.resume}: the run already took {steps_done} steps; pass --steps N with "
                         f"N > {steps_done} to continue it")
    _log(f"{corpus.source}: {N} training windows of {seq_len} tokens, "
         f"{0 if held is None else len(held)} held-out windows")
    return Data(corpus, windows, held, N, B, run["micro_batch_size"], q, steps_done, steps)


def plan_privacy(s: Setup, d: Data, prior: Optional[dict], prior_from: Optional[str]) -> Privacy:
    """The accountant continues the history (the prior one, then the resumed run's); sigma is calibrated for the
    total. Records steps, sigma and prior_from in s.run."""
    run, resumed = s.run, s.resumed
    accountant = PrivacyAccountant("pld")
    if prior is not None:
        accountant.load_state_dict(prior)
    if resumed is not None:  # the history up to the checkpoint (the prior one included)
        acc_state = (resumed.get("accountant") or (resumed.get("optimizer") or {}).get("accountant")
                     or resumed["extra"].get("accountant"))
        if acc_state:
            accountant.load_state_dict(acc_state)
    prior_eps = PrivacyAccountant("pld")
    if prior is not None:
        prior_eps.load_state_dict(prior)
    eps_prior = prior_eps.get_epsilon(run["delta"]) if prior is not None else 0.0
    if prior is not None and resumed is None:
        _log(f"{prior_from} records earlier DP training: {prior_eps.steps} steps, epsilon = {eps_prior:.4g} at "
             f"delta = {run['delta']}; this run continues that history (epsilon and --epsilon are totals)")
    p = Privacy(prior, prior_from, accountant, prior_eps, eps_prior, None, False)
    if s.private:
        p.sigma, p.recalibrated = _sigma(s, d, p)
        if run["delta"] > 1.0 / d.N:
            _log(f"warning: delta={run['delta']} is larger than 1/N = {1 / d.N:.2e}; the usual choice is delta << 1/N")
    run.update(steps=d.steps, noise_multiplier=p.sigma, prior_from=prior_from)
    return p


def _sigma(s: Setup, d: Data, p: Privacy) -> tuple[float, bool]:
    """(sigma, recalibrated): the resumed run's own sigma (same plan), --sigma, or the one calibrated for the target
    epsilon of the total history (--allow-overspend: for this run alone when the history already spent it)."""
    run, resumed, args, accountant = s.run, s.resumed, s.args, p.accountant
    same_plan = resumed is not None and d.steps == int(resumed["extra"]["run"]["steps"]) and (
        run["epsilon"] == resumed["extra"]["run"]["epsilon"])
    if resumed is not None and (run["sigma"] is not None or same_plan):
        return float((resumed.get("optimizer") or {}).get("noise_multiplier", run.get("noise_multiplier"))), False
    if run["sigma"] is not None:
        return run["sigma"], False
    history = accountant.history
    try:
        return get_noise_multiplier(run["epsilon"], run["delta"], d.q, d.steps - d.steps_done,
                                    history=history or None), resumed is not None
    except ValueError:
        spent = accountant.get_epsilon(run["delta"]) if history else 0.0
        if not history or not args.allow_overspend:
            where = (f"the run in {args.resume} (its {accountant.steps} steps)" if resumed is not None
                     else f"the earlier DP training recorded in {p.prior_from}")
            raise UsageError(
                f"--epsilon {run['epsilon']:g}: {where} already spent epsilon = {spent:.4g} at delta = "
                f"{run['delta']:g}, and the target applies to the total: no further step fits. "
                "Pass a larger --epsilon, or --allow-overspend to train anyway (epsilon then reports the "
                "true total)") from None
        sigma = get_noise_multiplier(run["epsilon"], run["delta"], d.q, d.steps - d.steps_done)
        _log(f"warning: --allow-overspend: the history already spent epsilon = {spent:.4g} > --epsilon "
             f"{run['epsilon']:g}; sigma = {sigma:.4g} is calibrated for this run alone, and the total "
             "epsilon will exceed the target")
        return sigma, resumed is not None


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (None on a CPU)."""
    if device.type != "cuda":
        return None

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return autocast


#: the torch.compile backend of a --no-dp run, by the DP run's backend: the same compiler without the DP pass
NO_DP_BACKENDS = {"flashdp": "inductor", "flashdp_eager": "aot_eager"}


class _BatchDynamic:
    """A compiled loss whose batch dim is dynamic and whose other dims are static: what dpcompile.compile with
    dynamic_seq=False does for the DP run (one graph for every micro-batch size >= 2; Dynamo specializes 0 and 1)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *batch: torch.Tensor):
        for t in batch:  # the ids, and memarc's targets
            if t.shape[0] >= 2:
                torch._dynamo.mark_dynamic(t, 0)
        return self.compiled(*batch)


def compile_no_dp(loss_model, dp_backend: str):
    """The --no-dp baseline compiled as the DP run is (same compiler, one graph, the batch dim dynamic and the
    window length static), without clipping or noise: its speed and its numerics are comparable with the DP run's."""
    return _BatchDynamic(torch.compile(loss_model, backend=NO_DP_BACKENDS[dp_backend], fullgraph=True,
                                       dynamic=False))


def build(s: Setup, m: Model, d: Data, p: Privacy) -> "Training":
    """The perplexity before training (after the privacy plan: a refused plan does not wait for an evaluation), the
    Poisson loader, the optimizer (DPOptimizer around AdamW unless --no-dp) and the compiled loss."""
    from .compile import compile as dp_compile
    from .privacy.optimizer import DPOptimizer
    from .privacy.sampling import PoissonDataLoader

    run, model, autocast = s.run, m.model, _autocast(s.device)
    if s.resumed is not None:
        ppl_before = s.extra.get("perplexity_before", float("nan"))
    else:
        ppl_before = perplexity(model, d.held, d.micro, s.device, autocast, "held-out perplexity (before)",
                                s.progress)
        if d.held is not None:
            _log(f"held-out perplexity before training: {ppl_before:.3f}")

    gen = None if run["secure_mode"] else torch.Generator().manual_seed(run["seed"])
    loader = PoissonDataLoader(torch.utils.data.TensorDataset(d.windows), expected_batch_size=d.B,
                               max_physical_batch_size=d.micro, steps=d.steps, generator=gen,
                               secure_mode=run["secure_mode"])
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=run["lr"], weight_decay=run["weight_decay"])
    loss_model = CausalLMLoss(model)
    dp_opts = dict(max_grad_norm=run["max_grad_norm"], clipping=run["clipping"], clip_fn=run["clip_fn"],
                   loss_reduction="mean", **_strategy_option(run["strategy"]))
    if not s.private:
        return Training(s, m, d, p, loader, inner, compile_no_dp(loss_model, run["backend"]), autocast, ppl_before)
    # every window has seq_len tokens: static lengths compile faster (no symbolic length in the joint trace, the
    # pass or the kernels) and the batch dim stays dynamic for Poisson's micro-batches
    step_model = dp_compile(loss_model, backend=run["backend"], dynamic_seq=False, **dp_opts)
    adaptive = run.get("adaptive_clipping")
    if adaptive is not None:  # a sigma the quantile release leaves no room for: refused before training
        from .privacy.engine import check_adaptive_noise

        check_adaptive_noise(loss_model, dp_opts, p.sigma, d.q * d.N, adaptive)
    optimizer = DPOptimizer(inner, noise_multiplier=p.sigma, max_grad_norm=run["max_grad_norm"],
                            expected_batch_size=d.q * d.N, loss_reduction="mean", secure_mode=run["secure_mode"],
                            generator=None if run["secure_mode"] else torch.Generator(s.device).manual_seed(
                                run["seed"] + 1),
                            accountant=p.accountant, sample_rate=d.q, adaptive_clipping=adaptive)
    optimizer.target_delta = run["delta"]
    loader.attach_optimizer(optimizer)
    return Training(s, m, d, p, loader, optimizer, step_model, autocast, ppl_before)


class Training:
    """A run being trained: its setup, model, data, privacy plan, loader and optimizer, and its progress so far
    (the curve, the tokens and seconds, continued from a resumed checkpoint); saves checkpoints and reports."""

    def __init__(self, s: Setup, m: Model, d: Data, p: Privacy, loader, optimizer, step_model, autocast,
                 ppl_before: float):
        self.s, self.m, self.d, self.p = s, m, d, p
        self.loader, self.optimizer, self.step_model, self.autocast = loader, optimizer, step_model, autocast
        self.ppl_before = ppl_before
        extra0 = s.extra
        self.rows = list(extra0.get("curve", []))
        self.tokens = int(extra0.get("tokens", 0))
        self.seconds_before = float(extra0.get("seconds", 0.0))
        self.first_step_s = extra0.get("first_step_seconds")
        self.last_loss = float("nan")
        self.step_times: list = []  # seconds of each step of this process
        self._tokens_start = self.tokens
        self._t0, self._tokens_at_t0 = 0.0, 0  # after the first step of this process (tokens per second)

    def seconds(self) -> float:
        """Seconds of the whole run (a resumed one's earlier seconds included)."""
        return self.seconds_before + time.time() - self.s.t_start

    def restore_and_plan(self) -> None:
        """--resume: the optimizer, sampler and torch RNG of the checkpoint. The privacy plan (a recalibrated sigma,
        the target epsilon), logged."""
        from .privacy.checkpoint import restore_checkpoint

        s, d, p, optimizer = self.s, self.d, self.p, self.optimizer
        run, args, resumed = s.run, s.args, s.resumed
        if resumed is not None:
            restore_checkpoint(resumed, optimizer=optimizer, data_loader=self.loader)
            if resumed["extra"].get("torch_rng") is not None:
                torch.set_rng_state(resumed["extra"]["torch_rng"])
            _log(f"resuming {args.resume} at step {d.steps_done} of {d.steps}")
            loaded = compile_cache.load(Path(args.resume))
            if loaded is not None:
                _log(f"compile cache of the checkpoint: {loaded}")
        if not s.private:
            _log(f"non-private baseline: no clipping, no noise; {d.steps - d.steps_done} steps of expected batch "
                 f"{d.B}")
            _log(first_step_forecast(s))
            return
        if p.recalibrated:
            optimizer.noise_multiplier = p.sigma
        if run["epsilon"] is not None and (resumed is None or p.recalibrated):
            optimizer.plan(target_epsilon=run["epsilon"], target_delta=run["delta"],
                           steps=p.accountant.steps + d.steps - d.steps_done, allow_overspend=args.allow_overspend)
        optimizer.allow_overspend = optimizer.allow_overspend or bool(args.allow_overspend)
        eps_planned = _history_eps(p.accountant.history + [(p.sigma, d.q, d.steps - d.steps_done)], run["delta"])
        _log(f"DP-SGD: sigma={p.sigma:.4f}, q={d.q:.3g} (expected batch {d.B}), {d.steps - d.steps_done} steps -> "
             f"epsilon={eps_planned:.3f} at delta={run['delta']}"
             f"{' in total with the earlier history' if p.accountant.steps else ''}; C={run['max_grad_norm']}, "
             f"{run['clipping']} clipping, backend {run['backend']}")
        _log(first_step_forecast(s))

    # -- checkpoints and the report ---------------------------------------------------------------------------
    def save(self, step: int, final: bool, report: Optional[dict] = None) -> None:
        """The transformers checkpoint, the tokenizer, dp_checkpoint.pt (the run record in its extra),
        dp_report.json and the curve, into --out."""
        from transformers.utils import logging as hf_logging

        from .privacy.checkpoint import save_checkpoint

        s, model, out_dir = self.s, self.m.model, self.s.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True  # for generate() after loading; training runs without a KV cache
        if not s.progress:
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(out_dir)
        finally:
            if not s.progress:
                hf_logging.enable_progress_bar()
            if hasattr(model.config, "use_cache") and not final:
                model.config.use_cache = False
        self.m.tok.save_pretrained(out_dir)
        extra = {"format": RUN_FORMAT, "version": 1, "run": s.run, "step": step, "curve": self.rows,
                 "tokens": self.tokens, "seconds": self.seconds(), "first_step_seconds": self.first_step_s,
                 "perplexity_before": self.ppl_before, "torch_rng": torch.get_rng_state(),
                 "accountant": self.p.accountant.state_dict(), "prior_accountant": self.p.prior,
                 "prior_from": self.p.prior_from}
        save_checkpoint(out_dir / DP_CHECKPOINT_NAME, module=None, optimizer=self.optimizer, data_loader=self.loader,
                        extra=extra)
        compile_cache.save(out_dir)  # `--resume` on another machine starts with these graphs compiled
        if report is None:
            report = self.report(step, final=False)
        (out_dir / REPORT_NAME).write_text(json.dumps(_json_safe(report), indent=1, default=str) + "\n")
        write_curve(out_dir, self.rows, f"dpcompile train: {s.run['model']} on {s.run['data']}")

    def report(self, step: int, final: bool, **more) -> dict:
        """dp_report.json: the run's settings, privacy and results at `step`."""
        s, d, p, run, private = self.s, self.d, self.p, self.s.run, self.s.private
        eps = p.accountant.get_epsilon(run["delta"]) if private else None
        return {
            "status": "finished" if final else f"checkpoint at step {step} of {d.steps}",
            "model": run["model"], "data": run["data"], "corpus_source": d.corpus.source, "device": str(s.device),
            "private": private, "epsilon": eps, "target_epsilon": run["epsilon"], "delta": run["delta"],
            "epsilon_is_total": bool(p.prior), "prior_history_from": p.prior_from,
            "prior_epsilon": p.eps_prior if p.prior else None, "prior_steps": p.prior_eps.steps if p.prior else 0,
            "noise_multiplier": p.sigma, "sample_rate": d.q, "steps": step, "planned_steps": d.steps,
            "expected_batch_size": d.B, "micro_batch_size": d.micro, "seq_len": run["seq_len"],
            "train_windows": d.N, "max_grad_norm": run["max_grad_norm"], "clipping": run["clipping"],
            "clip_fn": run["clip_fn"],
            "adaptive_thresholds": (dict(self.optimizer.adaptive.values)
                                    if private and getattr(self.optimizer, "adaptive", None) is not None else None),
            "backend": run["backend"] if private else NO_DP_BACKENDS[run["backend"]], "lr": run["lr"],
            "train_layers": run["train_layers"],
            "train_embeddings": run["train_embeddings"], "trainable_parameters": self.m.n_train,
            "held_out_windows": 0 if d.held is None else len(d.held), "perplexity_before": self.ppl_before,
            "final_loss": self.last_loss,
            "seconds": round(self.seconds(), 1),
            "first_step_seconds": self.first_step_s, "accountant": p.accountant.state_dict(),
            "command": "dpcompile " + " ".join(getattr(s.args, "argv", []) or ["train"]),
            "resumed_from": s.args.resume, **more,
        }

    # -- the training loop ------------------------------------------------------------------------------------
    def train_loop(self) -> tuple[int, float]:
        """The remaining steps, with a progress bar (or log lines) and --save-every checkpoints. Ctrl-C stops
        after the current step, saves it and raises KeyboardInterrupt. Returns (steps done, seconds)."""
        s, d = self.s, self.d
        self.last_loss = next((r["loss"] for r in reversed(self.rows) if r["examples"]), float("nan"))
        bar = _bar(self.loader, "DP training" if s.private else "training", s.progress, total=d.steps - d.steps_done)
        interrupted = False
        with _StopRequest() as stop:
            for step, micro_batches in enumerate(bar, start=d.steps_done):
                stats = self._step(micro_batches, step + 1)
                if s.progress:
                    bar.set_postfix(stats)
                elif step % max(1, d.steps // 20) == 0 or step == d.steps - 1:
                    _log(f"step {step + 1}/{d.steps}  " + "  ".join(f"{k} {v}" for k, v in stats.items())
                         + f"  ({time.time() - s.t_start:.0f}s)")
                done = step + 1
                if stop.requested and done < d.steps:
                    interrupted = True
                    break
                if s.out_dir is not None and s.args.save_every and done % s.args.save_every == 0 and done < d.steps:
                    self.save(done, final=False)
                    _log(f"checkpoint: step {done} of {d.steps} in {s.out_dir}")
        done = self.rows[-1]["step"] if self.rows else d.steps_done
        if interrupted:
            if s.out_dir is not None:
                self.save(done, final=False)
                _log(f"stopped at step {done} of {d.steps}; saved in {s.out_dir}: continue with "
                     f"`dpcompile train --resume {s.out_dir}`")
            raise KeyboardInterrupt
        return done, time.time() - s.t_start

    def _step(self, micro_batches, step: int) -> dict:
        """One logical batch: the micro-batches' gradients, the optimizer step; its row of the curve. Returns the
        progress stats."""
        s, d, private, optimizer = self.s, self.d, self.s.private, self.optimizer
        ts = time.time()
        total, count = 0.0, 0
        for (ids,) in micro_batches:
            ids = ids.to(s.device)
            if ids.shape[0] == 0 and not private:
                continue
            with self.autocast() if self.autocast else _nullcontext():
                loss = self.step_model(ids)
            if not private:
                loss = loss * ids.shape[0] / d.B  # sum of per-sample means / expected batch, as the DP step scales
            loss.backward()
            n = ids.shape[0]
            total += float(loss.detach()) * (n if private else d.B)
            count += n
            self.tokens += ids.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not private:
            self.p.accountant.step(noise_multiplier=0.0, sample_rate=d.q)  # recorded: no DP guarantee (epsilon = inf)
        return self._record(step, total, count, time.time() - ts)

    def _record(self, step: int, total: float, count: int, step_seconds: float) -> dict:
        """The step's row of the curve and its progress stats (loss, tokens per second, epsilon)."""
        step_times, private = self.step_times, self.s.private
        step_times.append(step_seconds)
        if len(step_times) == 1:
            record_first_step(self.s, step_times[0])
        if self.first_step_s is None:
            self.first_step_s = round(step_times[0], 1)
        if len(step_times) == 1:
            self._t0, self._tokens_at_t0 = time.time(), self.tokens
        if count:
            self.last_loss = total / count
        eps = self.p.accountant.get_epsilon(self.s.run["delta"]) if private else None
        self.rows.append({"step": step, "loss": self.last_loss if count else float("nan"), "epsilon": eps,
                          "examples": count, "tokens": self.tokens, "seconds": round(self.seconds(), 2)})
        elapsed = time.time() - self._t0
        tps = ((self.tokens - self._tokens_at_t0) / elapsed if len(step_times) > 1 and elapsed > 0
               else (self.tokens - self._tokens_start) / max(step_times[0], 1e-9))
        return {"loss": f"{self.last_loss:.3f}", "tok/s": f"{tps:.0f}", "eps": f"{eps:.2f}" if private else "-"}


# ---- the end of the run ---------------------------------------------------------------------------------------

def sample_text(model, tok, prompt: str, device) -> str:
    """The report's sample: `prompt` and 24 greedy tokens (the model is left in eval mode)."""
    model.eval()
    enc = tok(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def finish(t: Training, done: int) -> tuple[dict, float, float]:
    """The perplexity after training, the final report (with a generate() sample of --sample), the final save.
    Returns (report, perplexity after, epsilon spent)."""
    s, m, d = t.s, t.m, t.d
    model, tok, run = m.model, m.tok, s.run
    ppl_after = perplexity(model, d.held, d.micro, s.device, t.autocast, "held-out perplexity (after)", s.progress)
    eps_spent = t.p.accountant.get_epsilon(run["delta"]) if s.private else math.inf
    step_times = t.step_times
    report = t.report(done, final=True, perplexity_after=ppl_after,
                      mean_step_seconds=round(sum(step_times[1:]) / max(1, len(step_times) - 1), 2)
                      if step_times else None)
    if s.args.sample:
        report["sample"] = sample_text(model, tok, s.args.sample, s.device)
    if s.out_dir is not None:
        t.save(done, final=True, report=report)
        report["out"] = str(s.out_dir)
    elif hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    return report, ppl_after, eps_spent


def print_summary(t: Training, report: dict, train_s: float, ppl_after: float, eps_spent: float) -> None:
    """The summary on stdout: privacy, perplexity, final loss, sample, checkpoint."""
    s, d, p, run = t.s, t.d, t.p, t.s.run
    print("")
    print("=" * 72)
    print(f"dpcompile train: {run['model']} on {run['data']} ({d.N} windows x {run['seq_len']} tokens), {d.steps} "
          f"steps{f' (resumed at step {d.steps_done})' if s.resumed is not None else ''}, {train_s:.0f}s")
    if s.private:
        target = f", target {run['epsilon']:g}" if run["epsilon"] is not None else ""
        total = " in total" if p.prior else ""
        print(f"privacy:    epsilon = {eps_spent:.3f}{total} at delta = {run['delta']}{target}  (sigma = "
              f"{p.sigma:.4f}, q = {d.q:.3g}, C = {run['max_grad_norm']}, {run['clipping']} clipping)")
    else:
        print("privacy:    none (non-private baseline)")
    if p.prior:
        print(f"            composed of the model's DP history ({p.prior_eps.steps} steps recorded in {p.prior_from}, "
              f"epsilon = {p.eps_prior:.3f} alone) and this run's {d.steps} steps"
              + ("; the target is for the total" if s.private and run["epsilon"] is not None else ""))
    if d.held is not None:
        print(f"perplexity: {t.ppl_before:.3f} -> {ppl_after:.3f} on {len(d.held)} held-out windows")
    print(f"final loss: {t.last_loss:.4f}")
    if "sample" in report:
        print(f"sample:     {report['sample']!r}")
    if "out" in report:
        print(f"checkpoint: {report['out']}  (AutoModelForCausalLM.from_pretrained({report['out']!r}); "
              f"`dpcompile train --resume {report['out']} --steps N` continues it)")
    print("=" * 72)


# ---- helpers --------------------------------------------------------------------------------------------------

class _StopRequest:
    """Ctrl-C during training: the first one stops after the current step (which is then saved), a second one
    stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _log("interrupted: stopping after this step (Ctrl-C again to stop at once, unsaved)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _history_eps(history: list, delta: float) -> float:
    return _history_epsilon(history, delta, "pld", None)
