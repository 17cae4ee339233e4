"""compile_cache.py: Inductor's cache artifacts saved with a checkpoint serve a DP graph in another process with
empty caches (a resume on another machine), and the graph served gives the same clipped gradients."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from dpcompile import compile_cache

# the same DP model, batch and compile in both processes; prints the clipped gradients and Inductor's cache hits
PROGRAM = textwrap.dedent("""
    import json, sys
    import torch
    import dpcompile
    from dpcompile import compile_cache
    from torch._dynamo.utils import counters

    if sys.argv[1] != "-":
        print("LOADED", compile_cache.load(sys.argv[1]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    step = dpcompile.compile(model, backend="flashdp", max_grad_norm=0.1, clipping="per_layer",
                             loss_reduction="sum", dynamic_seq=False)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    step(x).square().sum().backward()
    if len(sys.argv) > 2:
        print("SAVED", compile_cache.save(sys.argv[2]))
    print("GRADS", json.dumps({n: p.grad.tolist() for n, p in model.named_parameters()}))
    print("HITS", counters["inductor"]["fxgraph_cache_hit"])
    # a served graph still vouches for its gradients: DPOptimizer refuses a gradient no clipping graph delivered
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                max_grad_norm=0.1, expected_batch_size=6.0, loss_reduction="sum")
    opt.step()
    print("STEPPED 1")
""")


def _run(tmp_path, name, *args):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"),
               TRITON_CACHE_DIR=str(tmp_path / f"triton-{name}"))
    r = subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    return lines


def test_a_checkpoints_artifacts_serve_the_dp_graph_in_a_fresh_process(tmp_path):
    out = tmp_path / "checkpoint"
    out.mkdir()
    first = _run(tmp_path, "first", "-", str(out))
    assert first["SAVED"] != "None" and (out / compile_cache.ARTIFACTS_NAME).stat().st_size > 0
    assert "inductor" in first["SAVED"]
    assert int(first["HITS"]) == 0  # empty caches: compiled
    second = _run(tmp_path, "second", str(out))
    assert "inductor" in second["LOADED"]
    assert int(second["HITS"]) >= 1  # served from the loaded artifacts, in a process with empty caches
    assert first["STEPPED"] == second["STEPPED"] == "1"
    a, b = json.loads(first["GRADS"]), json.loads(second["GRADS"])
    for name in a:
        torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), rtol=0, atol=0, msg=name)


def test_no_artifacts_no_file_and_a_damaged_file_is_skipped(tmp_path):
    assert compile_cache.load(tmp_path) is None
    (tmp_path / compile_cache.ARTIFACTS_NAME).write_bytes(b"not a cache")
    said = compile_cache.load(tmp_path)
    assert said is not None and "compiles from scratch" in said
