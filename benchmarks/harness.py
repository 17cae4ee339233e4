"""The benchmark harness: one training step, timed, per workload and mode, on one GPU, one process per mode.

    python benchmarks/harness.py                                # every workload, every mode
    python benchmarks/harness.py --workloads "gpt2-small B=8 T=1024" --modes "non-DP compiled,flashdp per_layer"
    python benchmarks/harness.py --out DIR                      # also writes DIR/results.json and DIR/table.md
    python benchmarks/harness.py --merge DIR/results.json --title "..."   # append a run to benchmarks/ (merge.py)

`dpcompile bench ARGS` runs this file from a source checkout. The models are in model_zoo.py, the ratios, the table
and --merge in merge.py.

Workloads follow ../shared/bench/peer_results.md: GPT-2-shaped plain PyTorch models (frozen token/position embeddings,
LayerNorm, fused qkv, SDPA causal attention, an untied 50304-wide lm_head that is trained), a Llama-style ~1.1B model
(RMSNorm, SwiGLU, grouped-query attention, rotary positions; frozen embedding, trained lm_head), and one GPT-2 run
with every parameter trainable. bf16 autocast, AdamW, mean over samples of per-sample token means, median of 8 timed
steps after 3 warm-up steps (3 after 2 where a step takes over 5 s: Opacus at long T), peak =
torch.cuda.max_memory_allocated. Ratios are against non-DP torch.compile of the same workload measured in the same
run. The flashdp modes include noise (DPOptimizer, sigma = 1) like the peers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # dpcompile from this checkout; model_zoo and merge beside this file

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from merge import add_ratios, merge, table  # noqa: E402
from model_zoo import build_model  # noqa: E402

WORKLOADS = {
    "gpt2-small B=8 T=1024": dict(model="gpt2-small", B=8, T=1024),
    "gpt2-medium B=8 T=1024": dict(model="gpt2-medium", B=8, T=1024),
    "gpt2-large B=8 T=1024": dict(model="gpt2-large", B=8, T=1024),
    "gpt2-small B=2 T=4096": dict(model="gpt2-small", B=2, T=4096),
    "llama-1.1b B=4 T=2048": dict(model="llama-1b", B=4, T=2048),
    "gpt2-small B=8 T=1024 all-trainable": dict(model="gpt2-small", B=8, T=1024, all_trainable=True),
    # the token embedding and the LM head one tied parameter, every parameter trained (issue 21 item 3)
    "gpt2-small B=8 T=1024 tied": dict(model="gpt2-small", B=8, T=1024, all_trainable=True, tied=True),
    # long contexts (randomized clipping, issue 5): two samples, so that per-sample clipping is not trivial
    "gpt2-small B=2 T=8192": dict(model="gpt2-small", B=2, T=8192),
    "gpt2-small B=2 T=16384": dict(model="gpt2-small", B=2, T=16384),
    "llama-1.1b B=2 T=4096": dict(model="llama-1b", B=2, T=4096),
    "llama-1.1b B=2 T=8192": dict(model="llama-1b", B=2, T=8192),
    "llama-1.1b B=2 T=16384": dict(model="llama-1b", B=2, T=16384),
}
#: what the harness runs by default (the issue-3 harness); the long-context ones are named explicitly
DEFAULT_WORKLOADS = list(WORKLOADS)[:7]
MODES = ["non-DP compiled", "non-DP compiled dynamic", "non-DP eager", "flashdp per_layer", "flashdp flat",
         "opacus ghost"]


# -- one mode in this process --------------------------------------------------------------------------------


def _opacus_step_fn(model, params, B, T):
    """Opacus ghost clipping (flat, as the peers table): the model returns logits, Opacus' criterion wraps the loss."""
    from opacus import PrivacyEngine

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            return self.m.logits(idx).float()

    opt = torch.optim.AdamW(params, lr=1e-4)
    data = torch.utils.data.TensorDataset(torch.zeros(64 * B, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=B)
    engine = PrivacyEngine()
    module, opt, criterion, _ = engine.make_private(
        module=Logits(model), optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(reduction="mean"), poisson_sampling=False)

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = module(x)
        loss = criterion(logits.flatten(0, 1), y.flatten(), shape=(B, T))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


#: (warm-up steps, timed steps) of a mode, the warm-up including compilation; a mode whose second step takes more
#: than _SLOW_STEP_S seconds (the compiled ones take under 1 s) is timed over _SLOW_STEPS instead
_STEPS = (3, 8)
_SLOW_STEP_S = 5.0
_SLOW_STEPS = (2, 3)


def run_mode(mode: str, workload: str, profile=False, gated: bool = False) -> dict:
    """profile: False, True (the PyTorch profiler, one step) or "host" (cProfile, five steps).
    gated: after the warm-up steps (compilation included) print READY and wait for a GO line on stdin before
    the timed steps, so that several modes compile at once while only one is timed at a time (run_all)."""
    spec = WORKLOADS[workload]
    B, T = spec["B"], spec["T"]
    torch.manual_seed(0)
    compile_mode = None
    if mode.endswith("+combo"):  # Inductor's combo kernels: independent small kernels share one launch
        import torch._inductor.config as inductor_config

        inductor_config.combo_kernels = True
        mode = mode[: -len("+combo")]
    if mode.endswith("+cudagraphs"):  # Inductor's CUDA graphs: torch.compile(mode="reduce-overhead") for both
        compile_mode = "reduce-overhead"
        mode = mode[: -len("+cudagraphs")]
    model = build_model(spec["model"], T, tied=spec.get("tied", False)).cuda()
    if not spec.get("all_trainable"):
        for p in model.frozen():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.lm_head.out_features
    idx = torch.randint(0, vocab, (B, T + 1), device="cuda")
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    if mode == "opacus ghost":
        inner = _opacus_step_fn(model, params, B, T)
    else:
        if mode == "non-DP compiled":
            step_model = torch.compile(model, mode=compile_mode)
        elif mode == "non-DP compiled dynamic":  # the sizes DP compiles symbolic (batch and sequence), for compile time
            step_model = torch.compile(model, mode=compile_mode)
            for t in (x, y):
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
        elif mode == "non-DP eager":
            step_model = model
        elif mode.startswith("flashdp "):
            import dpcompile

            options = dict(max_grad_norm=1.0, clipping=mode.split()[1], loss_reduction="mean")
            for extra in mode.split()[2:]:  # e.g. "flashdp per_layer strategy=direct", "... dynamic_seq=False"
                k, v = extra.split("=")
                options[k] = {"True": True, "False": False}.get(v, v)  # dynamic_seq=False: the length static
            step_model = dpcompile.compile(model, mode=compile_mode, **options)
        else:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        opt = torch.optim.AdamW(params, lr=1e-4)
        if mode.startswith("flashdp "):
            import dpcompile

            opt = dpcompile.DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)

        def inner(x, y, marks=None):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(x, y)
            if marks is not None:  # host time split: forward | backward | optimizer (enqueue, no sync)
                marks.append(time.perf_counter())
            loss.backward()
            if marks is not None:
                marks.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step():
        inner(x, y)
        torch.cuda.synchronize()

    times, enqueue, split = [], [], []
    torch.cuda.reset_peak_memory_stats()
    warm, timed = _STEPS
    i = 0
    while len(times) < timed:
        torch.cuda.synchronize()
        marks = [] if mode != "opacus ghost" else None
        t0 = time.perf_counter()
        inner(x, y, marks) if marks is not None else inner(x, y)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        if i >= warm:
            times.append(took)
            enqueue.append(t1 - t0)
            if marks:
                split.append((marks[0] - t0, marks[1] - marks[0], t1 - marks[1]))
        if i == 0:
            first = took
            print(f"    first step (compile) {took:.1f}s", file=sys.stderr, flush=True)
        if i == 1 and took > _SLOW_STEP_S:  # e.g. Opacus at long T: 11 steps would take minutes
            warm, timed = _SLOW_STEPS
            print(f"    {took:.1f}s a step: {warm} warm-up and {timed} timed steps", file=sys.stderr, flush=True)
        if i == warm - 1 and gated:
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "GO":
                raise SystemExit("bench: the driver went away before timing")
        i += 1
    result = {"tokens_per_s": B * T / statistics.median(times),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
              "host_ms": 1e3 * statistics.median(enqueue), "step_ms": 1e3 * statistics.median(times),
              # compile time: the first step minus a warm one (with --parallel, modes compile side by side)
              "compile_s": first - statistics.median(times)}
    if split:  # the host's share of each phase; a phase that waits for the GPU (a sync) shows up here too
        for k, name in enumerate(("fwd", "bwd", "opt")):
            result[f"host_{name}_ms"] = 1e3 * statistics.median(s[k] for s in split)
        result["syncs"] = _count_syncs(lambda: inner(x, y))
    if profile == "host":  # five more steps under cProfile: where the host (Python) time of a step goes, to stderr
        import cProfile
        import io
        import pstats

        prof_py = cProfile.Profile()
        prof_py.enable()
        for _ in range(5):
            inner(x, y)
        prof_py.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        stats = pstats.Stats(prof_py, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        print(f"== {workload} / {mode}: host profile of 5 steps\n{text.getvalue()}", file=sys.stderr)
    elif profile:  # one more step under the profiler: GPU busy time and the kernels that take it, to stderr
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            step()
        events = p.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        result["gpu_ms"] = gpu_us / 1e3
        # every op and kernel with its count: launches a step by name, for comparing modes offline
        print("PROFILE_JSON " + json.dumps({"workload": workload, "mode": mode, "events": [
            [e.key, e.count, e.self_device_time_total, e.self_cpu_time_total] for e in events]}), file=sys.stderr)
        print(f"== {workload} / {mode}: GPU kernel time {gpu_us / 1e3:.1f} ms\n"
              + events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
              + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
              file=sys.stderr)
    return result


def _count_syncs(step) -> int:
    """Host-device synchronizations in one step (torch's sync debug mode warns at each): a sync makes the host wait
    for the GPU queue, so a host-bound step with one is slower than its enqueue work alone."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


# -- the driver ----------------------------------------------------------------------------------------------


def meta() -> dict:
    import triton

    return {"gpus": 1, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}


# modes that hold the GPU's memory several times over or run no compiler: never warmed up beside others
_ALONE = ("non-DP eager", "opacus ghost")


def run_all(workloads: list, modes: list, profile, timeout: float, out: str | None = None,
            parallel: int = 1) -> list:
    """Every (workload, mode) in its own process. parallel > 1: up to that many compiled modes of one workload
    compile and warm up at the same time (compilation is most of the wall time), then take turns for the timed
    steps, so no two modes are ever timed together."""
    rows = []

    def save():  # after every mode: a run cut short still leaves its finished rows
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(add_ratios([dict(r) for r in rows], meta()), f, indent=1)

    for workload in workloads:
        batches = [[m] for m in modes] if parallel <= 1 else _batches(modes, parallel)
        for batch in batches:
            for row in _run_batch(workload, batch, profile, timeout):
                rows.append(row)
                save()
                if "tokens_per_s" in row:
                    print(f"    [{workload}] {row['mode']}: {row['tokens_per_s'] / 1e3:.1f}k tok/s, "
                          f"{row['peak_mem_gib']:.2f} GiB", file=sys.stderr, flush=True)
                else:
                    print(f"    [{workload}] {row['mode']}: {row['error']}", file=sys.stderr, flush=True)
    return add_ratios(rows, meta())


def _batches(modes: list, parallel: int) -> list:
    """Compiled modes `parallel` at a time (the baseline, every ratio's denominator, in the first batch and timed
    first), then the modes that must run alone."""
    shared = sorted((m for m in modes if m not in _ALONE), key=lambda m: m != "non-DP compiled")
    return [shared[i:i + parallel] for i in range(0, len(shared), parallel)] + [[m] for m in modes if m in _ALONE]


def _mode_command(workload: str, mode: str, profile, gated: bool) -> list:
    flag = ["--host-profile"] if profile == "host" else ["--profile"] if profile else []
    return [sys.executable, os.path.abspath(__file__), "--one", mode, "--workloads", workload] + flag + \
        (["--gated"] if gated else [])


def _run_batch(workload: str, modes: list, profile, timeout: float, command=_mode_command) -> list:
    """Start one process per mode; wait (up to `timeout` each) for every one to be warm; then time them in turn."""
    import tempfile

    gated = len(modes) > 1
    procs = []
    for mode in modes:
        print(f"[{workload}] {mode} ...", file=sys.stderr, flush=True)
        err = tempfile.TemporaryFile(mode="w+")
        cmd = command(workload, mode, profile, gated)
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        _PENDING.pop(p.stdout.fileno(), None)  # a new pipe may reuse a closed one's number
        procs.append((mode, p, err, time.time()))
    ready = {}
    for mode, p, err, t0 in procs:
        try:
            ready[mode] = _read_line(p, t0 + timeout, lambda line: line == "READY") if gated else "READY"
        except RuntimeError as e:
            ready[mode] = str(e)
    rows = []
    for mode, p, err, t0 in procs:
        row = {"workload": workload, "mode": mode}
        try:
            if ready[mode] != "READY":
                raise RuntimeError(ready[mode])
            if gated:
                p.stdin.write("GO\n")
                p.stdin.flush()
            line = _read_line(p, max(time.time() + 120, t0 + timeout), lambda line: line.startswith("{"))
            row.update(json.loads(line))
        except (RuntimeError, ValueError, OSError) as e:  # OSError: the child died before GO
            p.kill()
            err.seek(0)
            tail = err.read()
            print(tail[-5000:], file=sys.stderr, flush=True)
            lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
            row["error"] = (str(e) if str(e) not in ("", "EOF") or not lines else lines[-1])[:300]
        if profile:
            err.seek(0)
            text = err.read()
            print(text[-20000:], file=sys.stderr, flush=True)
            for ln in text.splitlines():  # whole, wherever they fall: the tail above may cut them
                if ln.startswith("PROFILE_JSON ") and ln not in text[-20000:]:
                    print(ln, file=sys.stderr, flush=True)
        p.wait()
        err.close()
        rows.append(row)
    return rows


def _read_line(p, deadline: float, want=lambda line: True) -> str:
    """The child's next stdout line that `want` accepts (libraries may print other lines), or RuntimeError when
    the deadline passes or the child exits first. Reads the pipe's file descriptor itself: a buffered readline
    could hold a second line in its buffer while select waits on the empty pipe."""
    import select

    fd = p.stdout.fileno()
    pending = _PENDING.setdefault(fd, b"")
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            _PENDING[fd] = pending
            text = line.decode(errors="replace").strip()
            if want(text):
                return text
        left = deadline - time.time()
        if left <= 0:
            raise RuntimeError("timed out (--timeout)")
        if select.select([fd], [], [], min(left, 5.0))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                _PENDING.pop(fd, None)
                raise RuntimeError("EOF")
            pending += chunk
            _PENDING[fd] = pending


_PENDING: dict = {}  # fd -> bytes read past the last returned line


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"comma-separated, from: {list(WORKLOADS)}")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {MODES}; 'flashdp STYLE key=value' passes options; "
                         "a '+cudagraphs' suffix turns on Inductor CUDA graphs, then '+combo' its combo kernels")
    ap.add_argument("--out", default=None, help="directory for results.json and table.md")
    ap.add_argument("--profile", action="store_true", help="profile one extra step per mode (GPU busy time)")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile five more steps per mode: where the step's host (Python) time goes")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mode before it is recorded as failed")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="results.json files to append to benchmarks/results.json and RESULTS.md (merge.py)")
    ap.add_argument("--title", default="benchmark run")
    ap.add_argument("--note", default="")
    ap.add_argument("--parallel", type=int, default=1,
                    help="compile up to this many compiled modes of a workload at once (they are timed in turn)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.merge is not None:
        merge(args.merge, args.title, args.note)
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {list(WORKLOADS)}")
    if args.one:
        profile = "host" if args.host_profile else args.profile
        print(json.dumps(run_mode(args.one, workloads[0], profile, args.gated)), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("the benchmark harness needs a CUDA GPU (the ratios are against compiled non-DP training on that GPU)",
              file=sys.stderr)
        return 2
    rows = run_all(workloads, [m.strip() for m in args.modes.split(",") if m.strip()],
                   "host" if args.host_profile else args.profile, args.timeout, args.out, args.parallel)
    text = table(rows)
    info = meta()
    print(f"\n{info}\n{text}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(f"{info}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
