"""The benchmark harness: one training step, timed, per workload and mode, on one GPU, one process per mode.

    python -m dpcompile.bench                                   # every workload, every mode
    python -m dpcompile.bench --workloads "gpt2-small B=8 T=1024" --modes "non-DP compiled,flashdp per_layer"
    python -m dpcompile.bench --out DIR                          # also writes DIR/results.json and DIR/table.md
    python -m dpcompile.bench --merge DIR/results.json --title "..."   # append a run to benchmarks/

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
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT_SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}
# TinyLlama-1.1B's shape: 22 layers, width 2048, 32 heads, 4 key/value heads, SwiGLU 5632, vocab 32000
LLAMA_1B = dict(n_layer=22, d=2048, n_head=32, n_kv_head=4, ffn=5632, vocab=32000)

WORKLOADS = {
    "gpt2-small B=8 T=1024": dict(model="gpt2-small", B=8, T=1024),
    "gpt2-medium B=8 T=1024": dict(model="gpt2-medium", B=8, T=1024),
    "gpt2-large B=8 T=1024": dict(model="gpt2-large", B=8, T=1024),
    "gpt2-small B=2 T=4096": dict(model="gpt2-small", B=2, T=4096),
    "llama-1.1b B=4 T=2048": dict(model="llama-1b", B=4, T=2048),
    "gpt2-small B=8 T=1024 all-trainable": dict(model="gpt2-small", B=8, T=1024, all_trainable=True),
    # long contexts (randomized clipping, issue 5): two samples, so that per-sample clipping is not trivial
    "gpt2-small B=2 T=8192": dict(model="gpt2-small", B=2, T=8192),
    "gpt2-small B=2 T=16384": dict(model="gpt2-small", B=2, T=16384),
    "llama-1.1b B=2 T=4096": dict(model="llama-1b", B=2, T=4096),
    "llama-1.1b B=2 T=8192": dict(model="llama-1b", B=2, T=8192),
    "llama-1.1b B=2 T=16384": dict(model="llama-1b", B=2, T=16384),
}
#: what `python -m dpcompile.bench` runs by default (the issue-3 harness); the long-context ones are named explicitly
DEFAULT_WORKLOADS = list(WORKLOADS)[:6]
MODES = ["non-DP compiled", "non-DP eager", "flashdp per_layer", "flashdp flat", "opacus ghost"]


# -- models ---------------------------------------------------------------------------------------------------


def per_sample_mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's token-mean cross-entropy (per-sample separable)."""
    tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return tok.view(targets.shape).mean(1).mean()


class GPTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer, d, h, T, vocab=50304):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(GPTBlock(d, h) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def logits(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))

    def forward(self, idx, targets):
        return per_sample_mean_ce(self.logits(idx), targets)

    def frozen(self):
        return [self.wte.weight, self.wpe.weight]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d, n_head, n_kv_head, ffn):
        super().__init__()
        self.h, self.kv, self.hd = n_head, n_kv_head, d // n_head
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.v = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        h = self.norm1(x)
        q = rotary(self.q(h).view(B, T, self.h, self.hd).transpose(1, 2), cos, sin)
        k = rotary(self.k(h).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        rep = self.h // self.kv  # grouped-query attention: each key/value head serves `rep` query heads
        k = k[:, :, None].expand(B, self.kv, rep, T, self.hd).reshape(B, self.h, T, self.hd)
        v = v[:, :, None].expand(B, self.kv, rep, T, self.hd).reshape(B, self.h, T, self.hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.o(y)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, n_layer, d, n_head, n_kv_head, ffn, vocab, T):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, n_head, n_kv_head, ffn) for _ in range(n_layer))
        self.norm, self.lm_head = nn.RMSNorm(d, eps=1e-5), nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def logits(self, idx):
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.lm_head(self.norm(x))

    def forward(self, idx, targets):
        return per_sample_mean_ce(self.logits(idx), targets)

    def frozen(self):
        return [self.embed.weight]


def build_model(name: str, T: int) -> nn.Module:
    if name.startswith("gpt2-"):
        return GPT(*GPT_SIZES[name.split("-")[1]], T)
    if name == "llama-1b":
        return Llama(**LLAMA_1B, T=T)
    raise ValueError(f"unknown benchmark model {name!r}; known: gpt2-small/medium/large, llama-1b")


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
    if mode.endswith("+cudagraphs"):  # experiment: Inductor's CUDA graphs, to see how launch-bound a mode is
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraphs = True
        mode = mode[: -len("+cudagraphs")]
    model = build_model(spec["model"], T).cuda()
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
            step_model = torch.compile(model)
        elif mode == "non-DP eager":
            step_model = model
        elif mode.startswith("flashdp "):
            import dpcompile

            options = dict(max_grad_norm=1.0, clipping=mode.split()[1], loss_reduction="mean")
            for extra in mode.split()[2:]:  # e.g. "flashdp per_layer strategy=direct"
                k, v = extra.split("=")
                options[k] = v
            step_model = dpcompile.compile(model, **options)
        else:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        opt = torch.optim.AdamW(params, lr=1e-4)
        if mode.startswith("flashdp "):
            import dpcompile

            opt = dpcompile.DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)

        def inner(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step():
        inner(x, y)
        torch.cuda.synchronize()

    times, enqueue = [], []
    torch.cuda.reset_peak_memory_stats()
    warm, timed = _STEPS
    i = 0
    while len(times) < timed:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inner(x, y)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        if i >= warm:
            times.append(took)
            enqueue.append(t1 - t0)
        if i == 0:
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
              "host_ms": 1e3 * statistics.median(enqueue), "step_ms": 1e3 * statistics.median(times)}
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
        print(f"== {workload} / {mode}: GPU kernel time {gpu_us / 1e3:.1f} ms\n"
              + events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
              + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
              file=sys.stderr)
    return result


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
    return [sys.executable, "-m", "dpcompile.bench", "--one", mode, "--workloads", workload] + flag + \
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
            print(err.read()[-20000:], file=sys.stderr, flush=True)
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
    lines = ["| workload | mode | tok/s | vs non-DP compiled | peak GiB | mem ratio | step ms | host ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['tokens_per_s'] / 1e3:.1f}k | "
                         f"{r.get('throughput_ratio', math.nan):.2f} | {r['peak_mem_gib']:.2f} | "
                         f"{r.get('memory_ratio', math.nan):.2f} | {r.get('step_ms', math.nan):.1f} | "
                         f"{r.get('host_ms', math.nan):.1f} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | failed: {r['error']} | | | | | |")
    return "\n".join(lines)


def merge(paths: list, title: str, note: str, results_json: str, results_md: str) -> None:
    """Append runs (results.json files from --out) to the repository's results.json and a dated RESULTS.md section."""
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
    ap = argparse.ArgumentParser(prog="dpcompile bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"comma-separated, from: {list(WORKLOADS)}")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {MODES}; 'flashdp STYLE key=value' passes options; "
                         "a '+cudagraphs' suffix turns on Inductor CUDA graphs")
    ap.add_argument("--out", default=None, help="directory for results.json and table.md")
    ap.add_argument("--profile", action="store_true", help="profile one extra step per mode (GPU busy time)")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile five more steps per mode: where the step's host (Python) time goes")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mode before it is recorded as failed")
    ap.add_argument("--merge", nargs="*", default=None, help="results.json files to append to benchmarks/")
    ap.add_argument("--title", default="benchmark run")
    ap.add_argument("--note", default="")
    ap.add_argument("--parallel", type=int, default=1,
                    help="compile up to this many compiled modes of a workload at once (they are timed in turn)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.merge is not None:
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
        merge(args.merge, args.title, args.note, os.path.join(root, "results.json"),
              os.path.join(root, "RESULTS.md"))
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
        print("dpcompile bench needs a CUDA GPU (the ratios are against compiled non-DP training on that GPU)",
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
