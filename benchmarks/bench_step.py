"""Kept for the commands quoted in RESULTS.md: the harness is `dpcompile.bench` (also `dpcompile bench`).

    python benchmarks/bench_step.py --workloads "gpt2-small B=8 T=1024" --out $OUT
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpcompile.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
