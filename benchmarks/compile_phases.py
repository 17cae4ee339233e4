"""Where the first step's compile time goes, DP against non-DP, phase by phase (issue 21 item 5).

    python benchmarks/compile_phases.py --model gpt2-small --B 8 --T 1024            # on the GPU machine
    python benchmarks/compile_phases.py --model gpt2-small --B 2 --T 16 --device cpu  # a quick look on CPU

Each mode runs in its own process with empty Inductor and Triton caches (a temporary TORCHINDUCTOR_CACHE_DIR), the
way a user's first run meets them; with --warm, a second process then compiles it again over those caches. Per
mode: the first step's seconds (forward, backward, optimizer), a warm step's,
the DP pass's own stages (passes/driver.py stage_seconds), and torch's per-phase compile timers
(torch._dynamo.utils.compile_times: Dynamo, AOTAutograd, the joint-graph passes our pass runs in, Inductor's
lowering, scheduling, code generation and the wait for its parallel kernel compiles). No profiler: the timers are
torch's own. A table of the phases of both modes prints last; --out keeps the records as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

#: the phases worth a row (compile_times' names, the same in torch 2.11 and 2.13); the rest go to the JSON
PHASES = ("_compile.compile_inner", "bytecode_tracing", "create_aot_dispatcher_function", "aot_trace_joint_graph",
          "pass.joint_graph_passes.joint_custom_pre_pass",
          "min_cut_rematerialization_partition", "compile_fx.<locals>.fw_compiler_base",
          "compile_fx.<locals>.bw_compiler", "GraphLowering.run", "Scheduler.__init__", "Scheduler.codegen",
          "PyCodeCache.load_by_key_path", "async_compile.wait", "build_guards")


#: with --cprofile: the cumulative seconds of these functions in the first step (name patterns of pstats), the
#: suspects of Inductor's DP backward compile: the mutation analysis of user Triton kernels compiles each call site
#: to TTIR (torch 2.11: identify_mutated_tensors, 2.13: identify_accessed_tensors), then autotuning and lowering
PROFILED = {
    "user kernels: TTIR": r"\(generate_ttir\)",
    "user kernels: mutation analysis": r"\(identify_(mutated|accessed)_tensors\)",
    "Inductor: lowering user kernels": r"lowering.py:\d+\(triton_kernel_wrap",
    "Triton autotune (benchmark)": r"autotuner.py.*\((_bench|benchmark)\)",
    "Triton compile (in process)": r"triton/compiler/compiler.py.*\(compile\)",
    "DP pass": r"\(run_dp_pass\)",
    "Inductor: compile_fx_inner": r"compile_fx.py:\d+\(compile_fx_inner\)",
    "Inductor: wait for workers": r"async_compile.py.*\(wait\)",
}


def _profiled(prof) -> dict:
    """{label: cumulative seconds} of the PROFILED functions, each counted once however it recurses."""
    import pstats
    import re

    stats = pstats.Stats(prof).stats
    out = {}
    for label, pattern in PROFILED.items():
        rx = re.compile(pattern)
        out[label] = sum(ct for (file, line, name), (_, _, _, ct, _) in stats.items()
                         if rx.search(f"{file}:{line}({name})"))
    return out


def run_one(mode: str, model_name: str, B: int, T: int, device: str, cprofile: str | None = None) -> dict:
    import logging

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from model_zoo import build_model

    warnings.filterwarnings("ignore")
    stages: dict = {}

    class _Stages(logging.Handler):  # the driver logs its stage seconds once per graph
        def emit(self, record):
            if "the pass took" in record.getMessage():
                for part in record.getMessage().split("took ", 1)[1].split(", "):
                    name, secs, _ = part.split(" ")
                    stages[name] = stages.get(name, 0.0) + float(secs)

    log = logging.getLogger("dpcompile")
    log.setLevel(logging.INFO)
    log.addHandler(_Stages())
    graph_nodes = _count_lowered_nodes()
    torch.manual_seed(0)
    model = build_model(model_name, T).to(device)
    for p in model.frozen():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    idx = torch.randint(0, model.lm_head.out_features, (B, T + 1), device=device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    if mode in ("non-DP", "non-DP-dynamic", "non-DP-dynamic-static"):
        step_model = torch.compile(model)
        if mode != "non-DP":  # the sizes DP compiles symbolic: what dynamic shapes cost, apart from DP
            for t in (x, y):  # -static: the length static, only the batch symbolic (as per_layer-static)
                torch._dynamo.mark_dynamic(t, 0)
                if mode == "non-DP-dynamic":
                    torch._dynamo.maybe_mark_dynamic(t, 1)
    else:
        import dpcompile

        clipping, _, static = mode.partition("-")  # per_layer-static: the length static (as `dpcompile train`)
        step_model = dpcompile.compile(model, max_grad_norm=1.0, clipping=clipping, loss_reduction="mean",
                                       dynamic_seq=static != "static")
        opt = dpcompile.DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)

    def step():
        with amp:
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times, profiled = [], {}
    for i in range(3):
        if i == 0 and cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0 and cprofile:
            prof.disable()
            os.makedirs(cprofile, exist_ok=True)
            prof.dump_stats(os.path.join(cprofile, f"{mode}.pstats"))
            profiled = _profiled(prof)
    from torch._dynamo.utils import counters

    caches = {f"{group} {k}": v for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
              if "cache" in k}  # fxgraph_cache_hit / _miss / _bypass, autograd_cache_hit / _miss / _saved
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    phases = {n: float(v) for n, v in zip(names, values)}
    return {"mode": mode, "model": model_name, "B": B, "T": T, "device": device, "first_s": times[0],
            "warm_s": times[-1], "compile_s": times[0] - times[-1], "pass_stages": stages, "phases": phases,
            "profiled": profiled, "caches": caches, "graph_nodes": graph_nodes, "torch": torch.__version__}


def _count_lowered_nodes() -> list:
    """The FX node count of every graph Inductor lowers (forward, then backward), filled in as they compile: the
    size of what Inductor's lowering, scheduling and code generation work through."""
    import torch._inductor.graph as inductor_graph

    counts: list = []
    run = inductor_graph.GraphLowering.run

    def counting_run(self, *args, **kwargs):
        counts.append(len(self.module.graph.nodes))
        return run(self, *args, **kwargs)

    inductor_graph.GraphLowering.run = counting_run
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small", help="a model_zoo name (gpt2-small/medium/large, llama-1b)")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="non-DP,non-DP-dynamic,per_layer",
                    help="non-DP, non-DP-dynamic (batch and sequence sizes symbolic, as DP compiles them), "
                         "non-DP-dynamic-static (only the batch symbolic, as Poisson sampling needs) and "
                         "dpcompile clipping modes (a -static suffix: the sequence dim static, only the batch "
                         "dynamic), comma-separated")
    ap.add_argument("--out", default=None, help="write the records here (JSON)")
    ap.add_argument("--cprofile", default=None, metavar="DIR",
                    help="the first step under cProfile (Python-heavy phases run ~2x slower): MODE.pstats in DIR, "
                         "and rows for the suspects of the DP backward compile (user-kernel TTIR, autotuning)")
    ap.add_argument("--warm", action="store_true",
                    help="run each mode a second time over the caches the first run left (a warm start: Inductor's "
                         "FX graph and AOTAutograd caches, Triton's kernels)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.model, args.B, args.T, args.device, args.cprofile)),
              flush=True)
        return
    records = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            for run in ("empty", "warm")[: 2 if args.warm else 1]:
                print(f"[{mode}] compiling with {run} caches ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model, "--B",
                                       str(args.B), "--T", str(args.T), "--device", args.device]
                                      + (["--cprofile", args.cprofile] if args.cprofile else []), env=env,
                                      capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"compile_phases: mode {mode} failed (rc {proc.returncode})")
                record = json.loads(lines[-1][len("RESULT "):])
                if run == "warm":  # a second process over the first one's on-disk caches (Inductor's, Triton's)
                    record["mode"] += " (warm)"
                records.append(record)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    head = ["phase (s)"] + [r["mode"] for r in records]
    rows = [["first step minus a warm step"] + [f"{r['compile_s']:.1f}" for r in records]]
    rows += [[p] + [f"{r['phases'].get(p, 0.0):.1f}" for r in records] for p in PHASES]
    for k, name in enumerate(("forward", "backward")):  # a warm run lowers nothing: no count
        rows.append([f"graph nodes: {name}"] + [str(r["graph_nodes"][k]) if len(r.get("graph_nodes", [])) > k
                                                else "-" for r in records])
    cache_names = sorted({k for r in records for k in r.get("caches", {})})
    rows += [[f"cache: {k}"] + [str(r.get("caches", {}).get(k, 0)) for r in records] for k in cache_names]
    if args.cprofile:
        rows += [[f"cProfile: {k}"] + [f"{r['profiled'].get(k, 0.0):.1f}" for r in records] for k in PROFILED]
    stage_names = sorted({s for r in records for s in r["pass_stages"]})
    rows += [[f"DP pass: {s}"] + [f"{r['pass_stages'].get(s, 0.0):.1f}" for r in records] for s in stage_names]
    print(f"\n{args.model} B={args.B} T={args.T} on {args.device}, torch {records[0]['torch']}, empty caches\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
