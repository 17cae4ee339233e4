"""Kept for the commands quoted in RESULTS.md: the harness is benchmarks/harness.py (also `dpcompile bench` from a
source checkout); this runs it with the same arguments.

    python benchmarks/bench_step.py --workloads "gpt2-small B=8 T=1024" --out $OUT
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
