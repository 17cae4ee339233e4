"""Where the first DP compile of a model goes: Dynamo, AOTAutograd and the DP pass's stages, under cProfile.

    python benchmarks/profile_compile.py                       # SmolLM2-135M, every parameter trained, CPU
    python benchmarks/profile_compile.py --model tiny-llama --clipping flat --out /tmp/prof.out

Prints the compile's wall time (profiled: Python-heavy work runs about 2x slower) and the cumulative seconds of
Dynamo's frame compile, AOTAutograd, the pass (passes/driver.py run_dp_pass) and each of its stages
(benchmarks/NOTES.md entry 15). --out keeps the raw pstats file for `python -m pstats`.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch

STAGES = r"_compile_inner|aot_module_simplified|run_dp_pass|driver.py:\d+\((batch_dims|discover|plan|rewrite|verify)\)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a dpcompile.data model name (default smollm2-135m)")
    ap.add_argument("--clipping", default="per_layer")
    ap.add_argument("--backend", default="flashdp_eager")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--dynamic-seq", action="store_true",
                    help="compile the sequence dim dynamic too (dpcompile.compile's default, as for the HF Trainer's "
                         "padded batches); without it the length is static, as `dpcompile train` compiles it")
    ap.add_argument("--out", default=None, help="write the pstats file here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import dpcompile
    from dpcompile.data import load_model
    from dpcompile.hf import CausalLMLoss

    model, _ = load_model(args.model, progress=False)
    model.train()
    step = dpcompile.compile(CausalLMLoss(model), backend=args.backend, max_grad_norm=1.0, clipping=args.clipping,
                             loss_reduction="mean", dynamic_seq=args.dynamic_seq)
    ids = torch.randint(0, min(1000, model.config.vocab_size), (args.batch, args.seq_len))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    step(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids)).backward()
    prof.disable()
    print(f"first call (compile and one step, profiled): {time.perf_counter() - t0:.1f} s")
    if args.out:
        prof.dump_stats(args.out)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(STAGES)


if __name__ == "__main__":
    main()
